"""Files shipped inside the package."""

from pathlib import Path

EMBEDDED_CHECKPOINT = Path(__file__).with_name("tiny-40k.ckpt")
EMBEDDED_DESCRIPTION = (
    "the embedded TINY RANDOM PanGu-alpha (hidden 32, 3 layers, the real 40000-token vocabulary "
    "and 1024 positions, float16 with float32 LayerNorm, as the released fp16 files). Its text is "
    "gibberish: it only shows the pipeline works. For real text pass --checkpoint "
    "PanguAlpha_2.6B_fp16.ckpt (or Pangu-alpha_2.6B.ckpt, PanguAlpha_13b_fp16.ckpt)."
)
