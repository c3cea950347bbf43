"""`extract`: a LoRA adapter from a base and a fine-tune (extract.py; plan.py decides what is
extracted and how; calibrate.py whitens by the input Gram with --calibrate). See docs/extract.md."""
