"""What the gallery's examples run with during ``make docs`` (named in ``conf.py``)."""

from __future__ import annotations

import os
from pathlib import Path


def reset_argv(gallery_conf: dict, script_vars: dict) -> list[str]:
    """The command-line arguments of one example in the build.

    The MDEQ example runs its ``--quick`` version (seconds instead of a minute) and writes
    its figure into the build folder, not into ``examples/``.

    Args:
        gallery_conf: sphinx-gallery's configuration.
        script_vars: the example being run (``"src_file"``: its path).

    Returns:
        The arguments after the script's name.
    """
    example = Path(script_vars["src_file"])
    if example.name == "mdeq_digits.py":
        out = Path(gallery_conf["src_dir"]) / "_build" / "mdeq-digits-quick.png"
        return ["--quick", "--out", os.path.relpath(out, example.parent)]  # printed: no home
    if example.name == "laplace_digits.py":  # the full run is in docs/guide/laplace.md
        out = Path(gallery_conf["src_dir"]) / "_build" / "laplace-digits-quick.png"
        return ["--quick", "--out", os.path.relpath(out, example.parent)]
    return []
