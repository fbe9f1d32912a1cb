"""The portal: loft's web face and its JSON API (``loft portal``). No torch, no mlflow here."""
