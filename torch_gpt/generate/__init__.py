"""`torch_gpt.generate(model, idx, n, ...)`, and the CLI `python -m torch_gpt.generate` as this package's
`__main__.py`.

A package, not a module, so that the function and the CLI share the name with no trick: `torch_gpt/__init__.py`
loads this package and then binds `torch_gpt.generate` to the function; importing the package again later finds
it loaded and leaves that binding alone, and `python -m` runs `__main__.py` (runpy warns about a module that was
imported before it runs it, never about a package).
"""

from torch_gpt.generation import generate, sample_next

__all__ = ["generate", "sample_next"]
