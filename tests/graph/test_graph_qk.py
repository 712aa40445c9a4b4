"""``attribution_graph(..., qk=True)``: every kept head carries its QK attribution by node, in
Neuronpedia's ``qk_tracing_results`` form, with ids that resolve to kept nodes or to
``qk_only_nodes``; the numbers are those of ``qk_attribution(by="nodes")``."""

from __future__ import annotations

import json

import pytest

import lin_lens
from lin_lens.graph import attribution_graph
from lin_lens.graph.export import json_node_ids, to_json
from tests.conftest import assert_same_state, state
from tests.graph.graph_cases import CASES, TOKENS, model, of_kind

FIELDS = ("pair_wise_contributors", "top_q_marginal_contributors", "top_k_marginal_contributors")


@pytest.mark.parametrize("backend, arch", CASES)
def test_every_kept_head_is_explained(backend, arch):
    m = model(backend, arch)
    before = state(m)
    g = attribution_graph(m, TOKENS, qk=True, qk_keys=2, qk_top=5)
    assert_same_state(before, m)
    heads = of_kind(g, "head")
    assert set(g.qk) == set(heads)
    known = set(json_node_ids(g)) | set(g.qk_only_nodes)
    for i in heads:
        qk = g.qk[i]
        assert all(f in qk for f in FIELDS)
        assert len(qk["pair_wise_contributors"]) <= 5
        for q, k, v in qk["pair_wise_contributors"]:
            assert q in known and k in known and isinstance(v, float)
        for f in FIELDS[1:]:
            assert all(n in known for n, _ in qk[f])
        info = qk["lin_lens"]
        assert info["relative_error"] < 1e-12
        assert len(info["keys"]) == min(2, int(g.pos[i]) + 1) or arch == "gemma"
    # the same numbers as the public function
    i = heads[0]
    att = lin_lens.qk_attribution(m, TOKENS[:int(g.target["pos"]) + 1], int(g.layer[i]),
                                  int(g.index[i]), query=int(g.pos[i]),
                                  keys=[g.qk[i]["lin_lens"]["key"]], by="nodes", top=5)
    got = sorted(v for _, v in g.qk[i]["top_q_marginal_contributors"])
    want = sorted(float(x) for x in att.q_marginal[0][
        att.q_marginal[0].abs().topk(len(got)).indices])
    assert got == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_the_json_carries_qk_tracing_results(tmp_path):
    g = attribution_graph(model("bridge", "llama"), TOKENS, qk=True)
    data = json.loads(json.dumps(to_json(g)))
    with_qk = [n for n in data["nodes"] if "qk_tracing_results" in n]
    assert len(with_qk) == len(of_kind(g, "head")) > 0
    assert g.meta["qk_seconds"] >= 0
    back = lin_lens.AttributionGraph.load(g.save(tmp_path / "g.pt"))
    assert back.qk.keys() == g.qk.keys()
