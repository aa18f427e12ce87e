"""The two Google backends as registered (:data:`klstream.backends.BACKENDS`): the Gemini
Developer API and Vertex AI. Both generate with logprobs through google-genai
(:mod:`klstream.backends.gemini`) and run batch jobs, through the Files API
(:mod:`klstream.backends.gemini_batch`) or Cloud Storage (:mod:`klstream.backends.vertex_batch`).
"""

from __future__ import annotations

from klstream.backends.base import Backend, BatchJobs, ClientSettings, Endpoint
from klstream.backends.gemini import gemini_endpoint, open_prefill, vertex_endpoint
from klstream.backends.gemini_batch import GeminiBatch
from klstream.backends.vertex_batch import VertexBatch


def gemini_batch_jobs(
    endpoint: Endpoint, settings: ClientSettings, bucket: str | None
) -> BatchJobs:
    """Batch jobs through the Files API (no bucket)."""
    return GeminiBatch(endpoint, settings)


def vertex_batch_jobs(
    endpoint: Endpoint, settings: ClientSettings, bucket: str | None
) -> BatchJobs:
    """Batch prediction jobs reading and writing JSONL in a Cloud Storage bucket."""
    return VertexBatch(endpoint, settings, bucket)


GEMINI = Backend("gemini", gemini_endpoint, prefill=open_prefill, batch_jobs=gemini_batch_jobs)
VERTEX = Backend("vertex", vertex_endpoint, prefill=open_prefill, batch_jobs=vertex_batch_jobs)
