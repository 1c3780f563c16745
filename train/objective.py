"""The objective: one table of loss kinds, read by everything that depends on the kind.

Each :class:`LossKind` in :data:`KINDS` says which stored fields its teacher(s) must provide,
which student output it trains (the logits, a learned projector of a student layer, or the
two DHO heads), which ``[[loss]]`` settings it needs, whether its temperature is the one
recorded in the store, and how its value is computed. Config validation
(:mod:`kdstore.train.config`), the dataset's field list (``Config.teachers``), model building
(:func:`kdstore.train.models.build_model`) and the loss sum (:func:`compute_loss`) all read it.

Adding a kind is one entry in :data:`KINDS` plus its ``compute`` function
``fn(term, x: TermInput) -> Tensor []``; document it in docs/LOSSES.md and docs/TRAINING.md.

Stored field names are resolved in one place, :func:`stored_fields`, from the store's own
output spec (what ``kdstore precompute`` writes); nothing else in ``train/`` spells them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from kdstore.store.errors import InputError
from kdstore.train import losses as L

if TYPE_CHECKING:
    from kdstore.store.reader import Store
    from kdstore.train.config import LossConfig
    from kdstore.train.mined import MinedNegatives


# --------------------------------------------------------------------------- stored field names


@lru_cache(maxsize=None)
def stored_fields(output: str, part: str = "") -> tuple[str, ...]:
    """The stored field names of one teacher output, as the store's ``OutputSpec`` writes them.

    ``logits`` → ``(logits,)``; ``topk`` → ``(values, indices, residual)`` in that order;
    ``embedding`` → ``(embedding,)``; ``scores`` with ``part`` ``max_prob`` or ``entropy`` →
    that score's field. The only place ``train/`` names stored fields.
    """
    from kdstore.store.schema import OutputSpec

    names = tuple(OutputSpec(kind=output, k=1 if output == "topk" else 0).fields())
    if part:
        names = tuple(n for n in names if n.rsplit("/", 1)[-1] == part)
        if not names:
            raise InputError(f"the store has no {output} field named {part!r}")
    return names


def logits_field() -> str:
    return stored_fields("logits")[0]


def embedding_field() -> str:
    return stored_fields("embedding")[0]


def recorded_temperature(store: "Store", teacher: str) -> float:
    """The temperature ``teacher``'s stored top-k residual (and online reduction) was computed at."""
    return float(store.teacher(teacher).spec.temperature)


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class TermInput:
    """What one term's ``compute`` sees for a batch of ``b`` rows.

    ``out``: student outputs (``logits [b, k]``, ``embedding [b, d]``, ``kd_logits``, ``proj/<i>``);
    ``proj``: this term's student tensor (projector output, the raw layer, or router logits
    ``[b, t]``; None for kinds that read none); ``tg``: this term's teacher targets
    ``{field: [b, ...], "valid": [b]}``; ``targets``: every teacher's; ``labels [b]`` (-1 =
    unlabelled); ``real [b]`` (not a pad); ``mask [b]`` (real and scored by the teacher);
    ``weights [b]`` or None; ``rows [b]`` store rows (-1 = pad); ``mined``: the term's negatives.
    """

    out: dict[str, Tensor]
    proj: Tensor | None
    tg: dict[str, Tensor]
    targets: dict[str, dict[str, Tensor]]
    labels: Tensor
    real: Tensor
    mask: Tensor
    weights: Tensor | None
    rows: Tensor
    mined: "MinedNegatives | None"


@dataclass(frozen=True, kw_only=True)
class LossKind:
    """One loss kind.

    Attributes:
        name: the ``kind`` of a ``[[loss]]`` entry.
        compute: ``fn(term, x: TermInput) -> Tensor []``, the term's unweighted value.
        fields: ``fn(term) -> (stored field, ...)`` each of the term's teachers must provide
            (sample weights add their score field on top).
        teachers: ``"none"``, ``"one"`` (``teacher = NAME``) or ``"many"`` (``teachers = [...]``).
        student: what it trains: ``"logits"`` (the head), ``"projector"`` (a learned map of
            ``student_layer`` to the stored field; a Projector is built), ``"layer"``
            (``student_layer`` as it is, e.g. for relational losses that work across dims),
            ``"router"`` (the logits, plus a learned ``TeacherRouter`` over the teachers fed
            ``router_input``) or ``"heads"`` (the DHO pair: a second head is built, and terms
            that train the logits are refused beside it).
        settings: the ``[[loss]]`` settings it reads, beyond kind, weight and teacher(s).
        required: ``{setting: message}`` settings that must be given.
        stored_temperature: its temperature is the one recorded in the store (a different
            configured one is refused).
    """

    name: str
    compute: Callable[["LossConfig", TermInput], Tensor]
    fields: Callable[["LossConfig"], tuple[str, ...]] = lambda term: ()
    teachers: str = "one"
    student: str = "logits"
    settings: tuple[str, ...] = ()
    required: tuple[tuple[str, str], ...] = ()
    stored_temperature: bool = False

    @property
    def projector(self) -> bool:
        return self.student == "projector"

    @property
    def second_head(self) -> bool:
        return self.student == "heads"

    @property
    def reads_logits(self) -> bool:
        """It reads the student's ``logits`` (the student must return them)."""
        return self.student in ("logits", "router", "heads")


def temperature(term: "LossConfig") -> float:
    if term.temperature is None:
        raise InputError(f"loss {term.kind}: temperature not resolved; call resolve_terms(terms, store) first")
    return term.temperature


def _ce(term, x: TermInput) -> Tensor:
    return L.cross_entropy(x.out["logits"], x.labels, mask=x.real)


def _kd(term, x: TermInput) -> Tensor:
    return L.soft_kl(x.out["logits"], x.tg[logits_field()], temperature(term), weights=x.weights, mask=x.mask)


def _topk_kd(term, x: TermInput) -> Tensor:
    values, indices, residual = stored_fields("topk")
    return L.topk_kl(x.out["logits"], x.tg[values], x.tg[indices], x.tg[residual], temperature(term),
                     weights=x.weights, mask=x.mask)


def _feature(term, x: TermInput) -> Tensor:
    return L.feature_match(x.proj, x.tg[target_field(term)], None, term.metric, weights=x.weights, mask=x.mask)


def _embedding(term, x: TermInput) -> Tensor:
    return L.embedding_cosine(x.proj, x.tg[target_field(term)], weights=x.weights, mask=x.mask)


def _contrastive(term, x: TermInput) -> Tensor:
    neg = x.mined
    row = x.rows.clamp(min=0)
    pos_rows, neg_rows = neg.positive[row], neg.negatives[row]
    return L.contrastive_distill(
        x.proj, neg.table[pos_rows.clamp(min=0)], neg.table[neg_rows.clamp(min=0)], temperature=temperature(term),
        neg_mask=neg_rows >= 0, weights=x.weights, mask=x.mask & (x.rows >= 0) & (pos_rows >= 0),
    )


def _dho(term, x: TermInput) -> Tensor:
    return L.dho_loss(x.out["logits"], x.out["kd_logits"], x.labels, x.tg[logits_field()], temperature(term),
                      term.alpha, weights=x.weights, mask=x.mask)


def _multi_kd(term, x: TermInput) -> Tensor:
    T = temperature(term)
    valid = torch.stack([x.targets[t]["valid"] for t in term.teachers]) & x.real
    probs = L.combine_teachers([x.targets[t][logits_field()] for t in term.teachers], T, term.combine,
                               term.teacher_weights or None, term.tau, teacher_mask=valid)
    return L.multi_teacher_kl(x.out["logits"], probs, T, weights=x.weights, mask=valid.any(0))


def _rkd_distance(term, x: TermInput) -> Tensor:
    return L.rkd_distance(x.proj, x.tg[target_field(term)], mask=x.mask)


def _rkd_angle(term, x: TermInput) -> Tensor:
    return L.rkd_angle(x.proj, x.tg[target_field(term)], mask=x.mask)


def _ranking(term, x: TermInput) -> Tensor:
    """In-batch listwise ranking KD: each row ranks the batch's other rows.

    Anchor i, candidates j != i among the rows that count (``mask``): teacher scores
    ``cos(t_i, t_j)`` of the stored vectors, student scores ``cos(s_i, s_j)`` of the student
    layer (both sides' dims may differ); ``ranking_distill`` is the KL between the two
    softmaxes over j (teacher at ``teacher_temperature``, student at ``temperature``).
    """
    keep = x.mask
    s = x.proj.flatten(1)
    b = s.shape[0]
    t = x.tg[target_field(term)].flatten(1).float()
    t = torch.where(keep[:, None], t, torch.zeros_like(t))  # a skipped row's NaNs never reach another row
    t = torch.nn.functional.normalize(t, dim=-1)
    candidates = keep[None, :] & ~torch.eye(b, dtype=torch.bool, device=s.device)
    return L.ranking_distill(s, s.unsqueeze(0).expand(b, -1, -1), t @ t.T, temperature(term),
                             candidate_mask=candidates, teacher_temperature=term.teacher_temperature,
                             weights=x.weights, mask=keep)


def _routed_kd(term, x: TermInput) -> Tensor:
    valid = torch.stack([x.targets[t]["valid"] for t in term.teachers]) & x.real
    return L.routed_teacher_kl(x.out["logits"], [x.targets[t][logits_field()] for t in term.teachers], x.proj,
                               temperature(term), top_k=term.top_k or None, balance_weight=term.balance_weight,
                               teacher_mask=valid, weights=x.weights, mask=x.real)


def target_field(term: "LossConfig") -> str:
    """The stored field a projector term matches: ``field``, or the stored embedding."""
    return term.field or embedding_field()


_TEACHER = "name its teacher (teacher = \"NAME\")"
KINDS: dict[str, LossKind] = {k.name: k for k in (
    LossKind(name="ce", compute=_ce, teachers="none"),
    LossKind(name="kd", compute=_kd, fields=lambda t: (logits_field(),),
             settings=("temperature", "sample_weights", "weight_power")),
    LossKind(name="topk_kd", compute=_topk_kd, fields=lambda t: stored_fields("topk"), stored_temperature=True,
             settings=("temperature", "sample_weights", "weight_power")),
    LossKind(name="feature", compute=_feature, fields=lambda t: (target_field(t),), student="projector",
             settings=("field", "student_layer", "metric", "sample_weights", "weight_power"),
             required=(("field", "name the stored field (e.g. features/embed)"),)),
    LossKind(name="embedding", compute=_embedding, fields=lambda t: (target_field(t),), student="projector",
             settings=("field", "student_layer", "sample_weights", "weight_power")),
    LossKind(name="dho", compute=_dho, fields=lambda t: (logits_field(),), student="heads",
             settings=("temperature", "alpha", "sample_weights", "weight_power")),
    LossKind(name="multi_kd", compute=_multi_kd, fields=lambda t: (logits_field(),), teachers="many",
             settings=("temperature", "combine", "teacher_weights", "tau", "sample_weights", "weight_power")),
    LossKind(name="contrastive", compute=_contrastive, fields=lambda t: (target_field(t),), student="projector",
             settings=("negatives", "field", "student_layer", "temperature", "sample_weights", "weight_power"),
             required=(("negatives", "name the mined negatives (negatives = \"NAME\", "
                                     "from `kdstore mine --name NAME`)"),)),
    LossKind(name="rkd_distance", compute=_rkd_distance, fields=lambda t: (target_field(t),), student="layer",
             settings=("field", "student_layer")),
    LossKind(name="rkd_angle", compute=_rkd_angle, fields=lambda t: (target_field(t),), student="layer",
             settings=("field", "student_layer")),
    LossKind(name="ranking", compute=_ranking, fields=lambda t: (target_field(t),), student="layer",
             settings=("field", "student_layer", "temperature", "teacher_temperature", "sample_weights",
                       "weight_power")),
    LossKind(name="routed_kd", compute=_routed_kd, fields=lambda t: (logits_field(),), teachers="many",
             student="router",
             settings=("temperature", "router_input", "router_hidden", "top_k", "balance_weight", "sample_weights",
                       "weight_power")),
)}
# Token-level kinds (LM students; train/objective_tokens.py), kept in their own module.
from kdstore.train.objective_tokens import token_kinds  # noqa: E402

KINDS.update({k.name: k for k in token_kinds(LossKind)})
LOSS_KINDS = tuple(KINDS)
DEFAULT_TEMPERATURE = 1.0


def term_fields(term: "LossConfig") -> tuple[str, ...]:
    """Stored fields each of ``term``'s teachers must provide (with its sample-weight score)."""
    fields = KINDS[term.kind].fields(term)
    if term.sample_weights:
        fields = fields + stored_fields("scores", term.sample_weights)
    return fields


def resolve_terms(terms: Sequence["LossConfig"], store: "Store") -> tuple["LossConfig", ...]:
    """The terms with every temperature set: the recorded one for stored-temperature kinds
    (a configured one that differs is refused, naming both), else the configured one or 1."""
    out = []
    for i, term in enumerate(terms):
        kind = KINDS[term.kind]
        T = term.temperature
        if kind.stored_temperature:
            recorded = recorded_temperature(store, term.teacher)
            if T is not None and T != recorded:
                raise InputError(
                    f"loss.{i} ({term.kind}): temperature {T:g} differs from the temperature {recorded:g} teacher "
                    f"{term.teacher}'s top-k residual was recorded at; a residual at one temperature cannot be mixed "
                    f"with values softened at another: drop the setting (the recorded {recorded:g} is used) or "
                    f"precompute the teacher with --temperature {T:g}"
                )
            T = recorded
        if "temperature" in kind.settings:
            term = dataclasses.replace(term, temperature=DEFAULT_TEMPERATURE if T is None else T)
        out.append(term)
    return tuple(out)


# --------------------------------------------------------------------------- the loss sum


def compute_loss(
    terms: Sequence["LossConfig"], out: dict[str, Tensor], batch: dict, num_classes: int,
    mined: dict[int, "MinedNegatives"] | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """``(total [], {"loss/<i>.<kind>": value})``: the weighted sum of ``terms`` on one batch.

    ``terms`` come from :func:`resolve_terms`. Pads and rows a teacher could not score are
    masked out of that teacher's terms; labels are -1 outside the labelled subset, which the
    CE parts ignore. ``mined[i]`` serves the contrastive term ``i``. The terms run outside any
    autocast (in float32): under bfloat16 the Gram matrices of the relational and retrieval
    losses lose their differences (``‖a‖² + ‖b‖² − 2ab`` cancels).
    """
    real = ~batch["pad"]
    targets = batch.get("targets", {})
    device = next(iter(out.values())).device
    total = torch.zeros((), dtype=torch.float32, device=device)
    parts: dict[str, float] = {}
    with torch.autocast(device_type=device.type, enabled=False):
        for i, term in enumerate(terms):
            value = _term_value(i, term, out, batch, real, targets, num_classes, mined)
            parts[f"loss/{i}.{term.kind}"] = float(value.detach())
            total = total + term.weight * value
    return total, parts


def _term_value(i: int, term: "LossConfig", out: dict, batch: dict, real: Tensor, targets: dict, num_classes: int,
                mined: dict | None) -> Tensor:
    tg = targets.get(term.teacher, {})
    x = TermInput(out=out, proj=out.get(f"proj/{i}"), tg=tg, targets=targets, labels=batch["label"], real=real,
                  mask=real & tg["valid"] if term.teacher else real,
                  weights=sample_weights(term, targets, num_classes), rows=batch["row"],
                  mined=(mined or {}).get(i))
    return KINDS[term.kind].compute(term, x)


def sample_weights(term: "LossConfig", targets: dict, num_classes: int) -> Tensor | None:
    """``[b]`` per-row weights from the teachers' stored confidence (mean over teachers), or None."""
    if not term.sample_weights:
        return None
    (name,) = stored_fields("scores", term.sample_weights)
    ws = [L.confidence_weights(targets[t][name].float(), term.sample_weights, num_classes, term.weight_power)
          for t in term.teacher_names]
    return torch.stack(ws).mean(0)


def describe(terms: Sequence["LossConfig"]) -> str:
    """``1·ce + 0.5·kd[cnn]``: the objective in one line."""
    return " + ".join(f"{t.weight:g}·{t.kind}" + (f"[{','.join(t.teacher_names)}]" if t.teacher_names else "")
                      for t in terms)


def check_term(term: "LossConfig", check: Callable[[bool, str], Any]) -> None:
    """Validate one ``[[loss]]`` entry against its kind (used by ``LossConfig``)."""
    kind = KINDS[term.kind]
    if kind.teachers == "one":
        check(bool(term.teacher), f"loss {term.kind}: {_TEACHER}")
    elif kind.teachers == "many":
        check(len(term.teachers) >= 1, f"loss {term.kind}: list its teachers")
    for setting, message in kind.required:
        check(bool(getattr(term, setting)), f"loss {term.kind}: {message}")
    takes = {"none": (), "one": ("teacher",), "many": ("teachers",)}[kind.teachers] + kind.settings
    given = [f.name for f in dataclasses.fields(term)
             if f.name not in ("kind", "weight") and f.name not in takes and getattr(term, f.name) != f.default]
    check(not given, f"loss {term.kind}: {', '.join(given)} does not apply to this kind "
                     f"(it takes weight{''.join(', ' + s for s in takes)})")


def check_terms(terms: Sequence["LossConfig"], check: Callable[[bool, str], Any]) -> None:
    """Validate the terms together: at most one two-head term, and no logits term beside it."""
    heads = [t for t in terms if KINDS[t.kind].second_head]
    names = "/".join(sorted({t.kind for t in heads}))
    check(len(heads) <= 1, f"at most one {names} loss term")
    logit_kinds = sorted({t.kind for t in terms if KINDS[t.kind].student in ("logits", "router")})
    check(not (heads and logit_kinds),
          f"a {names} term already holds the CE and KD parts; drop the {'/'.join(logit_kinds)} terms beside it")
