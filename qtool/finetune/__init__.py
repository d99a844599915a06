"""LoRA fine-tuning on quantized bases: recipes, data, training, adapters, merging."""
