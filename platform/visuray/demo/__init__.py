"""The main job (``visuray demo``): every stage of the platform on the bundled sample, end to end.

- :mod:`~visuray.demo.run`: the stages (ingest, DINO, fine-tuning, attributes, composed retrieval, indexes,
  Serve queried over HTTP, report);
- :mod:`~visuray.demo.specs`: the shipped job specs in ``jobs/configs/`` with the demo's overrides;
- :mod:`~visuray.demo.attributes`: the attribute stage (trained in process);
- :mod:`~visuray.demo.report`: the HTML report and its leave-one-out baseline table.

The demo sits on top of everything else: nothing in the library imports it.
"""

from visuray.demo.run import DemoOptions, pick_target_colours, run_demo
from visuray.demo.specs import scaled_steps

__all__ = ["DemoOptions", "pick_target_colours", "run_demo", "scaled_steps"]
