"""Methods for diffusers Stable Diffusion pipelines (importing this package registers them; it imports no
diffusers).

* `astar` — A-STAR; `attend_and_excite` — Attend-and-Excite (both on `concepts`: concept maps from loss
  forwards, a latent update before chosen steps);
* `detector_guidance` — Detector Guidance (masks from `detection`: providers, painting, halos);
* `losses` — concept maps and the A-STAR / A&E losses; `tokens` — token positions of concepts in a prompt.
"""

from steer.methods.diffusion import (  # noqa: F401
    astar,
    attend_and_excite,
    detector_guidance,
)
