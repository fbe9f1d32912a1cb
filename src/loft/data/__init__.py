"""Data: read and validate files, clean (dedup, PII), render chat templates with loss masks,
and prepare tokenized datasets cached by fingerprint: SFT rows (``prepare_dataset``) and
preference rows, paired or unpaired (``prepare_preference_dataset``).

Packing (``loft.data.packing``) is separate and imported on its own.
"""

from loft.data.formats import FORMATS, Record, detect_format, to_canonical
from loft.data.preference import prepare_preference_dataset, tokenize_preference
from loft.data.prepare import PreparedDataset, load_prepared, prepare_dataset, prepare_for
from loft.data.readers import read_records, validate_file
from loft.data.template import (
    IGNORE_INDEX,
    mask_segments,
    tokenize_conversation,
    tokenizer_fingerprint,
)
from loft.data.validate import ValidationReport

__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "PreparedDataset",
    "Record",
    "ValidationReport",
    "detect_format",
    "load_prepared",
    "mask_segments",
    "prepare_dataset",
    "prepare_for",
    "prepare_preference_dataset",
    "read_records",
    "to_canonical",
    "tokenize_conversation",
    "tokenize_preference",
    "tokenizer_fingerprint",
    "validate_file",
]
