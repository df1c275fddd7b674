"""External command-line tools the project drives but does not import, each from its own virtual env.

img2dataset pins versions (albumentations 1.x, webdataset 0.2) that cannot share an env with this project's
(webdataset 1.x): ``bash scripts/dev.sh setup`` installs it into ``.venv-img2dataset`` from
``requirements/img2dataset.lock.txt``, and users run it as the plain ``img2dataset`` command it is. Tests and
benchmarks find it here:

    from pipeline.tools import img2dataset_executable
    subprocess.run([str(img2dataset_executable()), "--url_list=...", ...], check=True)
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
IMG2DATASET_ENV_VAR = "IMG2DATASET"
"""Environment variable naming the img2dataset executable (scripts/dev.sh test sets it)."""
IMG2DATASET_VENV = REPO / ".venv-img2dataset"
"""Where scripts/dev.sh installs img2dataset when the variable is not set."""


def img2dataset_executable() -> Path:
    """The ``img2dataset`` command: $IMG2DATASET, else .venv-img2dataset/bin/img2dataset.

    Raises FileNotFoundError saying how to install it when neither exists.
    """
    named = os.environ.get(IMG2DATASET_ENV_VAR, "")
    path = Path(named) if named else IMG2DATASET_VENV / "bin" / "img2dataset"
    if not (path.is_file() and os.access(path, os.X_OK)):
        source = f"${IMG2DATASET_ENV_VAR}={named}" if named else str(path)
        raise FileNotFoundError(
            f"img2dataset not found at {source}: run `bash scripts/dev.sh setup` (installs it into "
            f"{IMG2DATASET_VENV.name} from requirements/img2dataset.lock.txt) or set ${IMG2DATASET_ENV_VAR}"
        )
    return path
