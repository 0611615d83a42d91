"""The fused step's contract and its checked entry points.

* ``layout``: the coefficient row every sampler step is (``Col``, ``NUM_COLS``, clip modes);
* ``args``: ``StepArgs``, the step's argument block carried down to the backends;
* ``checks``: one check per kind of argument;
* ``ops``: the checked ops (``guided_step``, ``temperature_lse_grad``, ``per_sample_rms``) and their
  unchecked halves; ``library``: the same ops registered with ``torch.library``;
* ``noise``: Gaussian noise drawn as diffusers draws it; ``cache``: the LRU cache; ``hooks``: kernel
  observation and routing.
"""
