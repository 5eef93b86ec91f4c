"""CoLD in transformers' `generate`, as a `custom_generate` method (transformers' layout for them).

    from cold.hf import CUSTOM_GENERATE_DIR
    out = peft_model.generate(**inputs, custom_generate=CUSTOM_GENERATE_DIR, trust_remote_code=True,
                              alpha=0.1, beta=0.5, max_new_tokens=64)
    out = model.generate(**inputs, custom_generate=CUSTOM_GENERATE_DIR, trust_remote_code=True, adapter="./my-lora")

`custom_generate/generate.py` needs only torch, transformers and peft (not this package), so the
directory can be pushed to a Hugging Face Hub repository as it is and used by its name
(`custom_generate="you/cold-decoding"`). transformers asks for `trust_remote_code=True` because it
runs that file.
"""

from __future__ import annotations

from pathlib import Path

CUSTOM_GENERATE_DIR = str(Path(__file__).parent)
