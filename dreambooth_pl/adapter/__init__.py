"""The adapter family: LoRA, DoRA, LoKr and LoHa, every kind readable and writable by every verb.

- kinds.py: one spec entry per kind (peft config, parameter names, layouts, maths) and injection for training.
- maths.py: each kind's rank and weight update.
- value.py: :class:`~.value.Adapter`, the in-memory value of any kind, and its checks.
- base.py: does an adapter fit a base model.
- diffusers_layout.py, kohya_layout.py: the two file layouts; files.py reads and writes files in either.
- checkpoint.py: the adapter a Lightning checkpoint holds.
- apply.py: an adapter onto base models as a peft adapter (sampling, fuse).
"""

# here, not in files.py: run folders (runs.py) name the file without importing torch
LORA_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' load_lora_weights looks for in a folder
