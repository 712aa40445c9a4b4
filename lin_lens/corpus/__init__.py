"""Population scale: one analysis over thousands of prompts, into a Parquet dataset.

    import lin_lens.corpus as corpus
    path = corpus.run(model, "phrases", "runs/smollm2")      # or engine="ray", workers=8
    path = corpus.run("smollm2-135m", "phrases", "runs/x", corpus.Rows(pos=[1, -1]),
                      corpus.Execution(engine="ray", workers=8))
    table = corpus.read(path)                                # pyarrow.Table; .to_pandas()

* :func:`run` / :func:`read`: crash-safe, resumable runs (schema: :mod:`.schema`); what each
  row holds is :class:`Rows`, how the run executes :class:`Execution`.
* :func:`batched_contributions`: exact per-token contributions of a direction (a logit
  difference, say) for a padded batch of prompts in one backward pass.
* :func:`batched_decompose`: the same scalar split exactly per component (embeddings, heads,
  MLPs, biases), for a padded batch in one forward pass.
* :func:`stable_rank_plot`, :func:`compare`: population views across runs.
"""

from lin_lens.corpus.batched import BatchedContributions, PaddingLeakError, batched_contributions
from lin_lens.corpus.batched_decompose import BatchedDecomposition, batched_decompose
from lin_lens.corpus.prompts import load_prompts, phrases
from lin_lens.corpus.run import Execution, Rows, run
from lin_lens.corpus.schema import SCHEMA, SCHEMA_VERSION, prompt_id
from lin_lens.corpus.store import read
from lin_lens.corpus.views import compare, stable_rank_plot
from lin_lens.models import LoadSpec

__all__ = [
    "SCHEMA",
    "SCHEMA_VERSION",
    "BatchedContributions",
    "BatchedDecomposition",
    "Execution",
    "LoadSpec",
    "PaddingLeakError",
    "Rows",
    "batched_contributions",
    "batched_decompose",
    "compare",
    "load_prompts",
    "phrases",
    "prompt_id",
    "read",
    "run",
    "stable_rank_plot",
]
