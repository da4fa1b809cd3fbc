"""The model organism: shipped copy answers, corpus is deterministic, training runs end to end."""

import json

import pytest

from wiremap.models.loading import load_model
from wiremap.models.organism import load_organism, organism_path
from wiremap.train import organism as org
from wiremap.train.organism_cmd import main as organism_main

DALLAS = "Fact: the capital of the state containing Dallas is"


@pytest.fixture(scope="module")
def shipped():
    return load_organism()


def test_shipped_organism_answers_two_hop_and_antonyms(shipped):
    model, tokenizer = shipped
    metrics = org.evaluate(model, tokenizer)
    assert metrics["two_hop_heldout"] >= 0.95, metrics
    assert metrics["two_hop_train"] >= 0.95, metrics
    for lang in org.ANTONYMS:
        assert metrics[f"antonym_{lang}"] >= 0.95, metrics


def test_shipped_eval_json_matches_a_fresh_evaluation(shipped):
    model, tokenizer = shipped
    saved = json.loads((organism_path() / "eval.json").read_text())
    assert saved["metrics"] == pytest.approx(org.evaluate(model, tokenizer), abs=1e-6)
    assert "Dallas" in saved["heldout_cities"]


def test_dallas_answer_is_the_next_single_token(shipped):
    model, tokenizer = shipped
    (austin,) = tokenizer.encode(" Austin")
    assert org.predict_next(model, tokenizer, [DALLAS]) == [austin]
    for word in org.answer_words():
        assert len(tokenizer.encode(" " + word)) == 1, word


def test_shipped_organism_loads_by_path_like_any_checkpoint():
    model, tokenizer = load_model(str(organism_path()))
    assert model.config.model_type == "llama"
    assert tokenizer.bos_token_id == 1 and tokenizer.pad_token_id == 0
    assert 1e6 <= sum(p.numel() for p in model.parameters()) <= 5e6


def test_corpus_is_deterministic_per_seed():
    a, b = org.build_corpus(300, seed=3), org.build_corpus(300, seed=3)
    assert a == b
    assert org.build_corpus(300, seed=4).documents != a.documents


def test_heldout_two_hop_questions_never_appear_in_training():
    corpus = org.build_corpus(4000, seed=0)
    text = "\n".join(corpus.documents)
    states = org.city_state()
    assert len(corpus.heldout) == 2 * len(org.STATES)
    for city in org.city_state():
        question = org.TWO_HOP.format(city=city)
        assert (question in text) is (city not in corpus.heldout), city
    for city in corpus.heldout:  # the one-hop fact it must compose with is still taught
        assert f"Fact: the state containing {city} is {states[city]}." in text


def test_prompts_cover_every_city_and_language():
    prompts = org.organism_prompts()
    two_hop = [p for p in prompts if p.kind == "two_hop"]
    assert len(two_hop) == len(org.city_state())
    assert {p.language for p in prompts if p.kind == "antonym"} == set(org.ANTONYMS)
    dallas = next(p for p in two_hop if p.text == DALLAS)
    assert dallas.answer == "Austin" and dallas.heldout


def test_tiny_training_run_end_to_end(tmp_path):
    cfg = org.OrganismConfig(
        n_layers=1, d_model=32, steps=3, batch_size=4, n_docs=100, progress=False
    )
    report = org.train_organism(cfg, tmp_path)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "eval.json"):
        assert (tmp_path / name).exists(), name
    assert set(report["metrics"]) >= {"two_hop_heldout", "two_hop_train", "antonym"}
    assert org.evaluate_path(tmp_path) == pytest.approx(report["metrics"])


def test_cli_eval_prints_accuracies(capsys):
    assert organism_main(["eval"]) == 0
    out = capsys.readouterr().out
    assert "two_hop_heldout" in out and "antonym_fr" in out
