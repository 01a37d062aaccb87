"""The data pipeline: the config's data section (config), where documents come from (sources), the
token cache (cache), windows and rows (packing), streams (streaming), the dealing of rows to
sources (mixture) and the one entry point, load_data (pipeline); the built-in corpus (corpus) and
instruction records rendered through a chat template (records). Imports the root modules only."""

from solarjax.data.cache import TokenCache, build_cache
from solarjax.data.config import IMPLICIT_SOURCE, DataConfig, MixtureStep, SourceConfig
from solarjax.data.mixture import Mixture, check_mixture_resume, exact_weights, seats
from solarjax.data.packing import PackedExamples, PackedSequences, stack_sequences
from solarjax.data.pipeline import Data, documents_in, load_data
from solarjax.data.sources import DataError, Source, resolve_sources
from solarjax.data.streaming import StreamedWindows

__all__ = ["TokenCache", "build_cache", "IMPLICIT_SOURCE", "DataConfig", "MixtureStep", "SourceConfig", "Mixture",
           "check_mixture_resume", "exact_weights", "seats", "PackedExamples", "PackedSequences", "stack_sequences",
           "Data", "documents_in", "load_data", "DataError", "Source", "resolve_sources", "StreamedWindows"]
