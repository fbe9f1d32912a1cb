"""loft — Local Fine-Tuning: data to a served, versioned fine-tuned model on your own hardware."""

__version__ = "0.1.0"
