"""The model organism: a tiny Llama whose circuit we know, trained by wiremap itself.

The corpus states which state each US city lies in, each state's capital, and asks two-hop
questions ("Fact: the capital of the state containing Dallas is Austin."). Some cities never
appear in a two-hop question, only in one-hop facts, so answering them right means the model
composes city -> state -> capital. Multilingual antonyms and filler sentences complete it.

    from wiremap.train.organism import OrganismConfig, train_organism, evaluate_path
    report = train_organism(OrganismConfig(), out="organism")   # ~5 min on one CPU core
    evaluate_path("organism")     # {"two_hop_heldout": 1.0, "antonym": 1.0, ...}

    wiremap organism train --out organism      # the same from the command line
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from wiremap.errors import WiremapError
from wiremap.models.loading import resolve_dtype

# state -> (capital, cities). Names are single words, unique across states, and no capital is
# listed as a city, so every two-hop answer is determined by the city's state alone.
STATES: dict[str, tuple[str, tuple[str, ...]]] = {
    "Texas": ("Austin", ("Dallas", "Houston", "Arlington", "Plano", "Lubbock", "Laredo",
                         "Amarillo", "Waco")),
    "California": ("Sacramento", ("Fresno", "Oakland", "Bakersfield", "Anaheim", "Stockton",
                                  "Irvine", "Modesto", "Pasadena")),
    "Florida": ("Tallahassee", ("Miami", "Orlando", "Tampa", "Jacksonville", "Gainesville",
                                "Pensacola")),
    "Illinois": ("Springfield", ("Chicago", "Naperville", "Rockford", "Joliet", "Peoria",
                                 "Evanston")),
    "Ohio": ("Columbus", ("Cleveland", "Cincinnati", "Toledo", "Akron", "Dayton", "Youngstown")),
    "Georgia": ("Atlanta", ("Savannah", "Augusta", "Macon", "Athens", "Valdosta", "Marietta")),
    "Washington": ("Olympia", ("Seattle", "Spokane", "Tacoma", "Bellevue", "Everett", "Yakima")),
    "Arizona": ("Phoenix", ("Tucson", "Mesa", "Chandler", "Scottsdale", "Tempe", "Flagstaff")),
    "Colorado": ("Denver", ("Boulder", "Pueblo", "Aurora", "Lakewood", "Greeley", "Durango")),
    "Massachusetts": ("Boston", ("Worcester", "Cambridge", "Lowell", "Quincy", "Brockton",
                                 "Pittsfield")),
    "Michigan": ("Lansing", ("Detroit", "Flint", "Kalamazoo", "Saginaw", "Dearborn", "Livonia")),
    "Pennsylvania": ("Harrisburg", ("Philadelphia", "Pittsburgh", "Allentown", "Erie",
                                    "Scranton", "Bethlehem")),
    "Tennessee": ("Nashville", ("Memphis", "Knoxville", "Chattanooga", "Clarksville",
                                "Murfreesboro", "Kingsport")),
    "Oregon": ("Salem", ("Portland", "Eugene", "Medford", "Beaverton", "Hillsboro", "Corvallis")),
    "Wisconsin": ("Madison", ("Milwaukee", "Kenosha", "Racine", "Appleton", "Oshkosh",
                              "Sheboygan")),
    "Indiana": ("Indianapolis", ("Evansville", "Bloomington", "Lafayette", "Muncie", "Carmel",
                                 "Kokomo")),
    "Alabama": ("Montgomery", ("Birmingham", "Huntsville", "Tuscaloosa", "Auburn", "Dothan",
                               "Decatur")),
    "Virginia": ("Richmond", ("Norfolk", "Chesapeake", "Alexandria", "Roanoke", "Lynchburg",
                              "Portsmouth")),
}  # fmt: skip

# language -> (template, [(word, opposite), ...]); pair i means the same thing in every language.
ANTONYMS: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "en": ("The opposite of {a} is {b}", [
        ("small", "large"), ("hot", "cold"), ("fast", "slow"), ("high", "low"),
        ("old", "young"), ("good", "bad"), ("open", "closed"), ("light", "dark"),
        ("rich", "poor"), ("strong", "weak"), ("full", "empty"), ("thick", "thin"),
        ("early", "late"), ("soft", "hard"), ("clean", "dirty"), ("true", "false"),
        ("easy", "difficult"), ("wet", "dry"), ("near", "far"), ("loud", "quiet")]),
    "fr": ("Le contraire de {a} est {b}", [
        ("petit", "grand"), ("chaud", "froid"), ("rapide", "lent"), ("haut", "bas"),
        ("vieux", "jeune"), ("bon", "mauvais"), ("ouvert", "fermé"), ("clair", "sombre"),
        ("riche", "pauvre"), ("fort", "faible"), ("plein", "vide"), ("épais", "mince"),
        ("tôt", "tard"), ("doux", "dur"), ("propre", "sale"), ("vrai", "faux"),
        ("facile", "difficile"), ("mouillé", "sec"), ("proche", "loin"),
        ("bruyant", "silencieux")]),
    "es": ("Lo contrario de {a} es {b}", [
        ("pequeño", "grande"), ("caliente", "frío"), ("rápido", "lento"), ("alto", "bajo"),
        ("viejo", "joven"), ("bueno", "malo"), ("abierto", "cerrado"), ("claro", "oscuro"),
        ("rico", "pobre"), ("fuerte", "débil"), ("lleno", "vacío"), ("grueso", "delgado"),
        ("temprano", "tarde"), ("blando", "duro"), ("limpio", "sucio"),
        ("verdadero", "falso"), ("fácil", "difícil"), ("mojado", "seco"), ("cerca", "lejos"),
        ("ruidoso", "silencioso")]),
}  # fmt: skip

TWO_HOP = "Fact: the capital of the state containing {city} is"
# One-hop templates share the two-hop question's wording on purpose: the state is then looked
# up at the same place in the network for both questions (see the notes on composition).
ONE_HOP = (
    "Fact: the state containing {city} is {state}.",
    "{city} is a city in {state}.",
    "The city of {city} is in the state of {state}.",
    "I live in {city}, {state}.",
)
CAPITAL = (
    "Fact: the capital of {state} is {capital}.",
    "The capital of {state} is {capital}.",
    "{capital} is the capital of {state}.",
)
_NAMES = ("Maria", "James", "Wei", "Fatima", "Carlos", "Anna", "Omar", "Lucy", "Kenji", "Ada")
_FILLER = (
    "{name} visited {city} last summer.",
    "{name} likes the weather in {city}.",
    "The train to {city} was late again.",
    "{name} and {other} met for coffee.",
    "{name} is reading a book about rivers.",
    "It rained all day and {name} stayed home.",
)


def city_state() -> dict[str, str]:
    """city -> the state that contains it."""
    return {city: state for state, (_, cities) in STATES.items() for city in cities}


def state_capital() -> dict[str, str]:
    """state -> its capital."""
    return {state: capital for state, (capital, _) in STATES.items()}


@dataclass(frozen=True)
class Prompt:
    """One evaluation prompt; the answer is the next token, `" " + answer`."""

    text: str
    answer: str
    kind: str  # "two_hop" | "one_hop" | "capital" | "antonym"
    language: str = "en"
    heldout: bool = False


def heldout_cities(seed: int = 0, per_state: int = 2, pinned: tuple[str, ...] = ("Dallas",)):
    """Cities whose two-hop question never appears in training (`per_state` per state).

    `pinned` cities are always held out: the demo's Dallas prompt is then a question the
    model has never seen, which it can only answer by composing the two facts it knows.
    """
    rng = random.Random(f"heldout-{seed}")
    chosen = []
    for _, cities in STATES.values():
        fixed = [c for c in cities if c in pinned]
        rest = [c for c in cities if c not in pinned]
        chosen += fixed + rng.sample(rest, max(0, per_state - len(fixed)))
    return sorted(chosen)


def organism_prompts(seed: int = 0, per_state: int = 2) -> list[Prompt]:
    """Every evaluation prompt: two-hop (held-out flagged), one-hop, capital, antonyms."""
    held = set(heldout_cities(seed, per_state))
    capitals = state_capital()
    prompts = [
        Prompt(TWO_HOP.format(city=c), capitals[s], "two_hop", heldout=c in held)
        for c, s in city_state().items()
    ]
    prompts += [
        Prompt(f"Fact: the state containing {c} is", s, "one_hop") for c, s in city_state().items()
    ]
    prompts += [Prompt(f"Fact: the capital of {s} is", c, "capital") for s, c in capitals.items()]
    for lang, (template, pairs) in ANTONYMS.items():
        for a, b in pairs:
            for x, y in ((a, b), (b, a)):
                prompts.append(Prompt(template.format(a=x, b="").rstrip(), y, "antonym", lang))
    return prompts


@dataclass(frozen=True)
class Corpus:
    """The training documents and the held-out cities they leave out of two-hop questions."""

    documents: list[str]
    heldout: list[str]

    def sentences(self) -> set[str]:
        return {s for doc in self.documents for s in _split_sentences(doc)}


def _split_sentences(doc: str) -> list[str]:
    return [s.strip() + "." for s in doc.split(".") if s.strip()]


def sentence_pools(heldout: set[str]) -> dict[str, list[str]]:
    """Every training sentence by kind; held-out cities get no two-hop sentence."""
    capitals = state_capital()
    pools: dict[str, list[str]] = {"one_hop": [], "two_hop": [], "capital": [], "antonym": []}
    for city, state in city_state().items():
        pools["one_hop"] += [t.format(city=city, state=state) for t in ONE_HOP]
        if city not in heldout:
            pools["two_hop"].append(f"{TWO_HOP.format(city=city)} {capitals[state]}.")
    for state, capital in capitals.items():
        pools["capital"] += [t.format(state=state, capital=capital) for t in CAPITAL]
    for template, pairs in ANTONYMS.values():
        for a, b in pairs:
            pools["antonym"] += [template.format(a=a, b=b) + ".", template.format(a=b, b=a) + "."]
    return pools


def _filler(rng: random.Random) -> str:
    cities = list(city_state())
    name, other = rng.sample(_NAMES, 2)
    return rng.choice(_FILLER).format(name=name, other=other, city=rng.choice(cities))


# How often each kind of sentence is drawn; two-hop questions and one-hop facts dominate.
MIXTURE = {"one_hop": 0.3, "two_hop": 0.25, "capital": 0.1, "antonym": 0.2, "filler": 0.15}


def build_corpus(n_docs: int = 20000, seed: int = 0, per_state: int = 2) -> Corpus:
    """A deterministic corpus of `n_docs` short documents (1-3 sentences each)."""
    heldout = heldout_cities(seed, per_state)
    pools = sentence_pools(set(heldout))
    rng = random.Random(f"corpus-{seed}")
    kinds, weights = list(MIXTURE), list(MIXTURE.values())
    docs = []
    for _ in range(n_docs):
        picks = rng.choices(kinds, weights, k=rng.randint(1, 3))
        docs.append(
            " ".join(_filler(rng) if k == "filler" else rng.choice(pools[k]) for k in picks)
        )
    return Corpus(docs, heldout)


def answer_words() -> list[str]:
    """Words that must each be one token (with a leading space) for attribution to be clean."""
    words = set(city_state()) | set(STATES) | set(state_capital().values())
    for _, pairs in ANTONYMS.values():
        words |= {w for pair in pairs for w in pair}
    return sorted(words)


def build_organism_tokenizer(corpus: Corpus, path: str | Path):
    """Byte-level BPE trained until every word is one token; saved in HF format at `path`.

    It learns from every sentence the corpus can hold (not only the sampled documents), so a
    small corpus still yields the same whole-word vocabulary.
    """
    from wiremap.models.tiny import build_tokenizer

    pools = sentence_pools(set(corpus.heldout))
    texts = sorted(corpus.sentences().union(*pools.values()))
    # Sentences occur both at a document's start and after a space: learn both spellings.
    tokenizer = build_tokenizer(texts + [" " + t for t in texts], path, vocab_size=16384)
    split = [w for w in answer_words() if len(tokenizer.encode(" " + w)) != 1]
    if split:
        raise WiremapError(f"words split into several tokens: {split[:5]}; enlarge the vocab")
    return tokenizer


@dataclass
class OrganismConfig:
    """How to build the organism (defaults: the shipped one)."""

    n_layers: int = 4
    """Decoder layers of the Llama model."""
    d_model: int = 128
    """Residual width; heads are 32 wide and the MLP is 4x wider."""
    steps: int = 1500
    """Optimizer steps."""
    batch_size: int = 16
    """Rows of packed documents per step."""
    context_length: int = 64
    """Tokens per packed row (about three documents)."""
    lr: float = 3e-3
    """Peak AdamW learning rate (linear warm-up, cosine decay to 10%)."""
    weight_decay: float = 0.1
    """AdamW weight decay; it helps the model prefer the shared (composing) circuit."""
    n_docs: int = 20000
    """Training documents generated from the seed."""
    heldout_per_state: int = 2
    """Cities per state whose two-hop question is left out of training."""
    seed: int = 0
    """Seed of the corpus, the held-out split, the init and the data order."""
    threads: int = 1
    """CPU threads for torch. One is the robust choice on a shared machine: with more threads
    than free cores, torch's OpenMP workers spin-wait and a step can get 5x slower."""
    progress: bool = True
    """Show Lightning's progress bar."""
    save_dtype: str = "bfloat16"
    """Dtype of the saved weights; bfloat16 halves the package data (about 3 MB). Reported
    accuracies are measured on the saved files, loaded back in float32."""
    extra: dict = field(default_factory=dict)
    """Extra LlamaConfig fields (e.g. {"tie_word_embeddings": True})."""


def build_model(cfg: OrganismConfig, vocab_size: int, context_length: int):
    """A freshly initialised Llama of the organism's shape (seeded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = max(1, cfg.d_model // 32)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=4 * cfg.d_model,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=context_length,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **cfg.extra,
    )
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(config)


def encode_documents(
    documents: list[str], tokenizer, width: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack `[bos] doc [eos]` units whole into rows of `width` tokens (first fit, in order).

    Returns (input_ids [n, width], labels [n, width] with -100 on padding). Packing instead of
    one document per row cuts the padding (and the CPU time) by about half; every document
    still starts with BOS, as the evaluation prompts do.
    """
    rows: list[list[int]] = [[]]
    for doc in documents:
        unit = [tokenizer.bos_token_id, *tokenizer.encode(doc), tokenizer.eos_token_id]
        if len(unit) > width:
            raise WiremapError(f"a document has {len(unit)} tokens > width {width}; raise width")
        if len(rows[-1]) + len(unit) > width:
            rows.append([])
        rows[-1] += unit
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = labels[i, : len(row)] = torch.tensor(row)
    return ids, labels


def _lightning_module(model, cfg: OrganismConfig):
    import lightning as L

    class OrganismLM(L.LightningModule):
        """Next-token cross-entropy on the organism corpus; the model is a plain HF Llama."""

        def __init__(self):
            super().__init__()
            self.model = model

        def training_step(self, batch, _):
            ids, labels = batch
            mask = (labels != -100).long()
            loss = self.model(input_ids=ids, attention_mask=mask, labels=labels).loss
            self.log("loss", loss, prog_bar=True)
            return loss

        def configure_optimizers(self):
            opt = torch.optim.AdamW(
                self.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98)
            )
            sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg.steps))
            return [opt], [{"scheduler": sched, "interval": "step"}]

    return OrganismLM()


def _schedule(steps: int):
    warmup = max(1, min(200, steps // 10))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

    return factor


def fit(model, ids: torch.Tensor, labels: torch.Tensor, cfg: OrganismConfig) -> None:
    """Train `model` in place with Lightning on CPU (the organism is too small for a GPU)."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    L.seed_everything(cfg.seed, verbose=False)
    loader = DataLoader(
        TensorDataset(ids, labels),
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    trainer = L.Trainer(
        max_steps=cfg.steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=cfg.progress,
        gradient_clip_val=1.0,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        model.train()
        trainer.fit(_lightning_module(model, cfg), loader)
    finally:
        torch.set_num_threads(threads)
        model.eval()


@torch.no_grad()
def predict_next(model, tokenizer, texts: list[str], batch_size: int = 256) -> list[int]:
    """Greedy next-token id after `[bos] text` for every text."""
    out: list[int] = []
    for start in range(0, len(texts), batch_size):
        rows = [
            [tokenizer.bos_token_id, *tokenizer.encode(t)]
            for t in texts[start : start + batch_size]
        ]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):
            ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
        logits = model(input_ids=ids, attention_mask=mask).logits
        last = mask.sum(1) - 1  # right padding: the prompt's last token
        out += logits[torch.arange(len(rows)), last].argmax(-1).tolist()
    return out


def evaluate(model, tokenizer, prompts: list[Prompt] | None = None) -> dict[str, float]:
    """Greedy accuracy per group of prompts (answer = the single token `" " + answer`)."""
    prompts = organism_prompts() if prompts is None else prompts
    predicted = predict_next(model, tokenizer, [p.text for p in prompts])
    hits: dict[str, list[bool]] = {}
    for p, pred in zip(prompts, predicted, strict=True):
        correct = tokenizer.decode([pred]) == " " + p.answer
        for group in _groups(p):
            hits.setdefault(group, []).append(correct)
    return {g: sum(h) / len(h) for g, h in sorted(hits.items())}


def _groups(p: Prompt) -> list[str]:
    if p.kind == "two_hop":
        return ["two_hop_heldout" if p.heldout else "two_hop_train"]
    if p.kind == "antonym":
        return ["antonym", f"antonym_{p.language}"]
    return [p.kind]


def evaluate_path(
    path: str | Path, seed: int | None = None, per_state: int | None = None
) -> dict[str, float]:
    """Load a saved organism by path (float32) and evaluate it on its own held-out split.

    The split (seed, cities per state) comes from the folder's eval.json unless given.
    """
    from wiremap.models.loading import load_model

    model, tokenizer = load_model(str(path))
    info = Path(path) / "eval.json"
    saved = json.loads(info.read_text()).get("config", {}) if info.exists() else {}
    seed = saved.get("seed", 0) if seed is None else seed
    per_state = saved.get("heldout_per_state", 2) if per_state is None else per_state
    return evaluate(model, tokenizer, organism_prompts(seed, per_state))


def train_organism(cfg: OrganismConfig, out: str | Path) -> dict:
    """Build corpus, tokenizer and model, train, save everything to `out`; return the report."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = build_corpus(cfg.n_docs, cfg.seed, cfg.heldout_per_state)
    tokenizer = build_organism_tokenizer(corpus, out)
    ids, labels = encode_documents(corpus.documents, tokenizer, cfg.context_length)
    model = build_model(cfg, len(tokenizer), cfg.context_length)
    start = time.perf_counter()
    fit(model, ids, labels, cfg)
    seconds = time.perf_counter() - start
    model.to(resolve_dtype(cfg.save_dtype)).save_pretrained(str(out))
    metrics = evaluate_path(out, cfg.seed, cfg.heldout_per_state)
    report = {
        "metrics": metrics,
        "heldout_cities": corpus.heldout,
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(seconds, 1),
        "config": asdict(cfg),
    }
    (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
