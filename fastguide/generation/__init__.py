"""Scale-out generation: seeded, sharded, resumable sample sets on one process or a torchrun job.

* ``models``: ``ModelSpec``, the description of a model that generation (and other tools) sample, and
  ``load_model`` for ``--model digits`` / ``--model package.module:factory``;
* ``seeds``: seed specs (``"0-49999"``, ``"0-9,20,30-31"``) and the seed -> shard -> batch layout;
* ``store``: the run directory's files, all written atomically with sha256 sidecars;
* ``comm``: torch.distributed (gloo on CPU, nccl on CUDA) or one process;
* ``generate``: ``generate(GenerateConfig(...))``, the run itself;
* ``evaluate``: ``evaluate(dir)``, the model's scores of a finished set;
* ``cli``: ``register(subparsers)`` adds ``fastguide generate`` and ``fastguide evaluate``.

>>> from fastguide.generation import GenerateConfig, generate, evaluate
>>> generate(GenerateConfig(out="run", seeds="0-999", model="digits", method="cfg"))
>>> evaluate("run")["accuracy"]
"""

from .evaluate import evaluate, format_scores
from .generate import GenerateConfig, GenerateResult, GenerationError, generate
from .models import ModelSpec, from_uint8_images, load_model, to_uint8_images
from .seeds import SeedSpecError, format_seeds, parse_seeds, shard_seeds

__all__ = ["GenerateConfig", "GenerateResult", "GenerationError", "ModelSpec", "SeedSpecError", "evaluate",
           "format_scores", "format_seeds", "from_uint8_images", "generate", "load_model", "parse_seeds",
           "shard_seeds", "to_uint8_images"]
