"""One streaming engine for every data-set operator: passes, checks, store and ranks.

A data-set operator — :class:`deqhess.DatasetEquilibrium`, :class:`deqhess.ModelCurvature`
and their distributed forms — is one pass over the data per product block. This
package is that pass, once: the loop and its reduction rule (:class:`Stream`), the
fingerprints that check every pass reads the same samples and gets the same results
from the model (:mod:`~deqhess.streaming.fingerprint`, :mod:`~deqhess.streaming.record`),
the budgeted store of solved batches and warm starts keyed by content
(:class:`BatchStore`), and the agreement of the ranks (:mod:`~deqhess.streaming.ranks`).
Each front end only forms one batch and says what to compute on it.
"""

from __future__ import annotations

from .engine import REDUCTIONS, Addend, Batch, Formed, Stream, check_reduction
from .fingerprint import batch_key, response_sketch, sample_hashes
from .ranks import RankFailedError, agree_on_setup, agreed
from .record import PassCheck, PassRecord, response_tolerance
from .store import DEFAULT_CACHE_BYTES, BatchStore, Offer, StoredBatch

__all__ = [
    # the pass
    "REDUCTIONS",
    "Addend",
    "Batch",
    "Formed",
    "Stream",
    "check_reduction",
    # the checks
    "PassCheck",
    "PassRecord",
    "batch_key",
    "response_sketch",
    "response_tolerance",
    "sample_hashes",
    # the store
    "DEFAULT_CACHE_BYTES",
    "BatchStore",
    "Offer",
    "StoredBatch",
    # the ranks
    "RankFailedError",
    "agree_on_setup",
    "agreed",
]
