"""PROV export round-trips through prov.read; Parquet through pyarrow."""

import io

import prov
import pyarrow.parquet as pq
import pytest
from _post_runs import build_run

import provhpc
from provhpc.post.export import export, to_prov


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return provhpc.open(build_run(tmp_path_factory.mktemp("x"), "run-x"))


def _by_type(doc):
    out = {}
    for rec in doc.get_records():
        out.setdefault(type(rec).__name__, []).append(rec)
    return out


def test_prov_json_round_trip(run):
    text = export(run, "prov-json")["text"]
    doc = prov.read(io.StringIO(text), format="json")
    assert doc == to_prov(run)
    recs = _by_type(doc)
    acts = recs["ProvActivity"]
    assert len(acts) == len(run.tasks())
    assert all(a.get_startTime() is not None and a.get_endTime() is not None for a in acts)
    rank_agents = [a for a in recs["ProvAgent"]
                   if str(next(iter(a.get_attribute("prov:type")))) == "prov:SoftwareAgent"]
    assert sorted(int(next(iter(a.get_attribute("provhpc:rank")))) for a in rank_agents) \
        == [0, 1]
    for kind in ("ProvUsage", "ProvGeneration", "ProvDerivation", "ProvCommunication",
                 "ProvMembership", "ProvAssociation", "ProvDelegation"):
        assert recs.get(kind), kind
    assert any(ns.uri == "https://w3id.org/provhpc/ns#" for ns in doc.get_registered_namespaces())


def test_derivation_path_raw_to_checkpoint_in_document(run):
    doc = prov.read(io.StringIO(export(run, "prov-json")["text"]), format="json")
    label = {}
    for e in _by_type(doc)["ProvEntity"]:
        label[e.identifier] = str(next(iter(e.get_attribute("prov:label"))))
    derived = {}
    for d in _by_type(doc)["ProvDerivation"]:
        a = dict(d.attributes)
        derived.setdefault(a[prov.model.PROV_ATTR_GENERATED_ENTITY], []).append(
            a[prov.model.PROV_ATTR_USED_ENTITY])
    ckpt = next(i for i, name in label.items() if name.endswith(".npy") and "model" in name)
    seen, todo = set(), [ckpt]
    while todo:
        cur = todo.pop()
        seen.add(cur)
        todo += [x for x in derived.get(cur, []) if x not in seen]
    assert any(label[i].endswith("raw.npy") for i in seen)


def test_prov_n_and_lineage_subgraph(run):
    text = export(run, "prov-n")["text"]
    assert text.startswith("document") and "wasDerivedFrom(" in text
    from provhpc.post.lineage import lineage

    ck = run.entities()[run.entities()["kind"] == "checkpoint"]["key"][0]
    sub = lineage(run, ck).to_prov()
    assert len(_by_type(sub)["ProvActivity"]) == len(lineage(run, ck).activities())


def test_parquet(run, tmp_path):
    files = export(run, "parquet", str(tmp_path / "pq"))["files"]
    tables = {f.rsplit("/", 1)[1][:-8]: pq.read_table(f) for f in files}
    for name, t in tables.items():
        assert t.num_rows == len(run.table(name)), name
    attrs = tables["attributes"].to_pydict()
    lr = [v for k, v in zip(attrs["key"], attrs["value_num"]) if k == "lr"]
    assert lr == [0.05, 0.05]


# prov 2.x's RDF serializer still calls rdflib's deprecated Dataset.default_context
@pytest.mark.filterwarnings("ignore:Dataset.default_context is deprecated:DeprecationWarning")
def test_prov_o_is_rdf_with_an_activity_per_task(run):
    rdflib = pytest.importorskip("rdflib", reason="the [prov] extra brings rdflib")
    g = rdflib.Graph().parse(data=export(run, "prov-o")["text"], format="turtle")
    prov_ns = rdflib.Namespace("http://www.w3.org/ns/prov#")
    activities = set(g.subjects(rdflib.RDF.type, prov_ns.Activity))
    assert len(activities) == len(run.tasks())
    assert set(g.subjects(prov_ns.wasDerivedFrom, None))
