"""The model zoo: a base model, LoRA experts and task files to search merges over."""
