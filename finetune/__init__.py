"""finetune: an offline-first fine-tuning pipeline on the Hugging Face stack."""

__version__ = "0.1.0"
