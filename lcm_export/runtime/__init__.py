"""The lean runtime: numpy + tokenizers + Pillow + the engine backend. Imports neither torch nor diffusers.

    from lcm_export.runtime import LCMPipeline
    pipe = LCMPipeline.from_engine_dir("engines/demo-sd15")
    images = pipe("a photo of an astronaut riding a horse", steps=4, guidance=1.0, seed=0)
    print(pipe.last_timings.line())
"""

from .pipeline import LCMPipeline, NonFiniteOutput, Timings
from .scheduler import LCMScheduler
from .tokenizer import ClipTokenizer

__all__ = ["LCMPipeline", "LCMScheduler", "ClipTokenizer", "NonFiniteOutput", "Timings"]
