"""Low-rank pass: replace dense layers by two thin factors from a truncated SVD.

Plain: W ≈ U_r Σ_r V_rᵀ, the best rank-r weight in Frobenius norm. Activation-aware (SVD-LLM / ASVD
style): with X the layer's inputs on calibration text and XXᵀ = S Sᵀ (Cholesky), the SVD of W S gives
Ŵ = U_r Σ_r V_rᵀ S⁻¹, the rank-r weight that minimises the output error ||(W − Ŵ) X|| instead.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from llmshrink.context import Context
from llmshrink.errors import LlmshrinkError
from llmshrink.modules.low_rank import LowRankLinear, dense_weight
from llmshrink.modules.low_rank_embedding import LowRankEmbedding, padding_row_zero
from llmshrink.passes.base import PassRecord
from llmshrink.passes.configs.low_rank import LowRankConfig
from llmshrink.targeting import check_tied, find_embeddings, find_targets, replace_module, untie

CALIBRATION_WINDOW = 256  # tokens per calibration forward
CALIBRATION_BATCH = 8  # windows per forward


def apply(model, cfg: LowRankConfig, ctx: Context) -> PassRecord:
    targets = [] if cfg.targets is None else find_targets(model, cfg.targets, cfg.exclude, cfg.layers,
                                                          field="low_rank.targets")
    tied = check_tied(model, targets, cfg.tied_embeddings, "low_rank", "compress it")
    tables = (find_embeddings(model, cfg.embedding_targets, cfg.exclude, "low_rank.embedding_targets")
              if cfg.embeddings else [])
    tied += check_tied(model, tables, cfg.tied_embeddings, "low_rank", "compress it",
                       field="embedding_targets")
    _check_ranks(targets + tables, cfg)  # before any work: a bad config fails fast
    grams, calibration_tokens = None, None
    if cfg.activation_aware and targets:
        ids = ctx.train_token_ids()[: cfg.calibration_tokens]
        ctx.log(f"  collecting input statistics of {len(targets)} layers on {ids.numel()} calibration tokens")
        grams = input_grams(model, [module for _, module in targets], ids)
        calibration_tokens = ids.numel()
    layers, skipped, untied = [], [], []
    for (name, module), gram in zip(targets, grams or [None] * len(targets), strict=True):
        start = time.perf_counter()
        weight = dense_weight(module).to(torch.float64)
        out_features, in_features = weight.shape
        dense_params = out_features * in_features
        whiten, damping = (None, None) if gram is None else _cholesky(gram, cfg.damping)
        matrix = weight if whiten is None else weight @ whiten
        rank, factors = _factorise(matrix, cfg, name, ctx.seed)
        if rank * (out_features + in_features) >= dense_params:
            skipped.append({
                "name": name, "shape": [out_features, in_features], "rank": rank,
                "reason": f"rank {rank} x ({out_features} + {in_features}) = "
                          f"{rank * (out_features + in_features)} params >= {dense_params} dense",
            })
            ctx.log(f"  {name}: {out_features}x{in_features} kept dense (rank {rank} saves nothing)")
            continue
        u, v = factors
        if whiten is not None:
            v = torch.linalg.solve_triangular(whiten, v, upper=False, left=False)  # Vᵀ S⁻¹
        dtype = module.weight.dtype
        new = LowRankLinear.from_factors(u.to(dtype), v.to(dtype), getattr(module, "bias", None))
        entry = {
            "name": name,
            "shape": [out_features, in_features],
            "rank": rank,
            "params_before": dense_params,
            "params_after": rank * (out_features + in_features),
            "rel_error": round(_relative(weight - u @ v, weight), 6),
        }
        if gram is not None:
            plain = _factorise(weight, cfg, name, ctx.seed, rank=rank)[1]
            entry["rel_output_error"] = round(_relative(weight - u @ v, weight, gram), 6)
            entry["rel_output_error_plain"] = round(_relative(weight - plain[0] @ plain[1], weight, gram), 6)
            entry["damping"] = float(f"{damping:.3g}")
        entry["seconds"] = round(time.perf_counter() - start, 3)
        layers.append(entry)
        if name in tied:  # only a layer that is replaced: one kept dense stays tied
            untie(model, name)
            untied.append(name)
        replace_module(model, name, new)
        ctx.log(
            f"  {name}: {out_features}x{in_features} -> rank {rank}, rel. weight error {entry['rel_error']:.4f}"
            + (f", output error {entry['rel_output_error']:.4f} (plain SVD: {entry['rel_output_error_plain']:.4f})"
               if gram is not None else "")
        )
    embeddings = [entry for name, module in tables
                  if (entry := factorise_embedding(model, name, module, cfg, ctx, skipped, untied if name in tied
                                                   else None))]
    return {
        "rule": cfg.rule(),
        "activation_aware": cfg.activation_aware,
        "randomized": cfg.randomized,
        "calibration_tokens": calibration_tokens,
        "layers": layers,
        **({"embeddings": embeddings} if cfg.embeddings else {}),
        "skipped": skipped,
        "untied": untied,
        "params_before": sum(entry["params_before"] for entry in layers + embeddings),
        "params_after": sum(entry["params_after"] for entry in layers + embeddings),
    }


def choose_rank(singular_values: torch.Tensor | None, out_features: int, in_features: int,
                cfg: LowRankConfig, name: str = "") -> int:
    """The rank `cfg` asks for on an (out, in) layer; `singular_values` (descending) are needed for energy."""
    if cfg.rank is not None:
        return cfg.rank
    if cfg.ratio is not None:
        # The small epsilon keeps an exact product (e.g. 16.0) from flooring to 15 through rounding.
        rank = math.floor(cfg.ratio * out_features * in_features / (out_features + in_features) + 1e-9)
        if rank < 1:
            smallest = (out_features + in_features) / (out_features * in_features)
            raise LlmshrinkError(
                f"low_rank: {name}: ratio {cfg.ratio} gives rank 0 for {out_features}x{in_features}; "
                f"rank 1 needs ratio >= {smallest:.4g}"
            )
        return rank
    power = singular_values.to(torch.float64) ** 2
    total = power.sum()
    if total == 0:
        return 1
    share = power.cumsum(0) / total
    # Smallest k with share[k-1] >= energy; the tolerance lets energy 1.0 stop at the last nonzero value.
    return min(int((share < cfg.energy - 1e-12).sum()) + 1, power.numel())


@torch.no_grad()
def input_grams(model: nn.Module, modules: list[nn.Module], token_ids: torch.Tensor) -> list[torch.Tensor]:
    """Σ x xᵀ (float64, in x in) of each module's inputs over `token_ids`, run through the model in windows."""
    from llmshrink.eval.perplexity import max_positions

    device = next(model.parameters()).device
    sizes = [dense_weight(m).shape[1] for m in modules]
    grams = [torch.zeros(n, n, dtype=torch.float64, device=device) for n in sizes]

    def hook(gram):
        def accumulate(_module, args):
            x = args[0].detach().reshape(-1, gram.shape[0]).to(torch.float64)
            gram.addmm_(x.T, x)
        return accumulate

    handles = [m.register_forward_pre_hook(hook(gram)) for m, gram in zip(modules, grams, strict=True)]
    window = min(CALIBRATION_WINDOW, max_positions(model) or CALIBRATION_WINDOW)
    ids = torch.as_tensor(token_ids).reshape(-1).long()
    full = ids.numel() // window
    # (fewer tokens than one window: no full windows, and splitting an empty tensor gives one empty chunk)
    chunks = [c for c in ids[: full * window].view(full, window).split(CALIBRATION_BATCH) if c.shape[0]]
    if ids.numel() > full * window:
        chunks.append(ids[full * window:][None])
    was_training = model.training
    model.eval()
    try:
        for chunk in tqdm(chunks, desc="calibration", unit="batch", leave=False):
            model(input_ids=chunk.to(device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return grams


# --- Embedding tables (embeddings: true): E (V x H) ≈ A (V x r) B (r x H), see modules/low_rank_embedding.py ---


def factorise_embedding(model: nn.Module, name: str, module: nn.Embedding, cfg: LowRankConfig, ctx: Context,
                        skipped: list, untied: list | None) -> dict | None:
    """Replace the table `name` by a LowRankEmbedding of the rank cfg asks for (its record entry), or add it to
    `skipped` when that saves nothing (None). `untied`: the list to name it in once untied, if it is tied."""
    start = time.perf_counter()
    weight = module.weight.detach().to(torch.float64)
    rows, dim = weight.shape
    rank, factors = _factorise(weight, cfg, name, ctx.seed)
    if rank * (rows + dim) >= rows * dim:
        skipped.append({"name": name, "shape": [rows, dim], "rank": rank,
                        "reason": f"rank {rank} x ({rows} + {dim}) = {rank * (rows + dim)} params >= {rows * dim} "
                                  "dense"})
        ctx.log(f"  {name}: {rows}x{dim} embedding kept dense (rank {rank} saves nothing)")
        return None
    dtype = module.weight.dtype
    new = LowRankEmbedding.from_factors(factors[0].to(dtype), factors[1].to(dtype), padding_row_zero(module))
    entry = {
        "name": name,
        "shape": [rows, dim],
        "rank": rank,
        "params_before": rows * dim,
        "params_after": rank * (rows + dim),
        "rel_error": round(_relative(weight - new.to_dense().detach().to(torch.float64), weight), 6),
        "padding_idx": new.padding_idx,
        "method": ("randomized SVD" if cfg.randomized else "plain SVD")
                  + (" (activation_aware applies to Linear layers only)" if cfg.activation_aware else ""),
        "seconds": round(time.perf_counter() - start, 3),
    }
    if untied is not None:
        untie(model, name)
        untied.append(name)
    replace_module(model, name, new)
    ctx.log(f"  {name}: {rows}x{dim} embedding -> rank {rank}, rel. weight error {entry['rel_error']:.4f}")
    return entry


def _check_ranks(targets, cfg: LowRankConfig) -> None:
    """Refuse a rank that a target cannot hold."""
    for name, module in targets:
        out_features, in_features = dense_weight(module).shape
        if cfg.rank is not None and cfg.rank > min(out_features, in_features):
            raise LlmshrinkError(
                f"low_rank: {name}: rank {cfg.rank} exceeds min({out_features}, {in_features}) = "
                f"{min(out_features, in_features)}"
            )


def _factorise(matrix: torch.Tensor, cfg: LowRankConfig, name: str, seed: int, rank: int | None = None):
    """(rank, (U√Σ, √ΣVᵀ)) of `matrix` at `rank` or the rank cfg chooses; factors None if it saves nothing."""
    out_features, in_features = matrix.shape
    if not cfg.randomized:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        rank = rank or choose_rank(s, out_features, in_features, cfg, name)
        root = s[:rank].sqrt()
        return rank, (u[:, :rank] * root, root[:, None] * vh[:rank])
    if rank is None:
        # Energy needs the whole spectrum; singular values alone still cost less than a full SVD.
        spectrum = torch.linalg.svdvals(matrix) if cfg.energy is not None else None
        rank = choose_rank(spectrum, out_features, in_features, cfg, name)
    if rank * (out_features + in_features) >= out_features * in_features:
        return rank, None
    sketch = min(rank + cfg.oversample, out_features, in_features)
    with torch.random.fork_rng(devices=[matrix.device] if matrix.device.type == "cuda" else []):
        torch.manual_seed(seed)  # the sketch is random: same seed, same factors
        u, s, v = torch.svd_lowrank(matrix, q=sketch, niter=cfg.power_iters)
    root = s[:rank].sqrt()
    return rank, (u[:, :rank] * root, root[:, None] * v[:, :rank].T)


def _cholesky(gram: torch.Tensor, damping: float) -> tuple[torch.Tensor, float]:
    """Lower S with S Sᵀ = XXᵀ + λI; λ starts at damping·mean(diag) and grows x10 until XXᵀ + λI factors."""
    scale = float(gram.diagonal().mean())
    lam = damping * (scale if scale > 0 else 1.0)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    for _ in range(12):
        factor, info = torch.linalg.cholesky_ex(gram + lam * eye)
        if int(info) == 0:
            return factor, lam
        lam *= 10
    raise LlmshrinkError(f"low_rank: input statistics do not factor even with damping {lam:.3g}")


def _relative(error: torch.Tensor, weight: torch.Tensor, gram: torch.Tensor | None = None) -> float:
    """||E|| / ||W||, or with `gram` = XXᵀ the output error ||E X|| / ||W X|| = sqrt(tr(E XXᵀ Eᵀ) / tr(W XXᵀ Wᵀ))."""
    if gram is None:
        return float(error.norm() / weight.norm().clamp_min(1e-30))
    num = ((error @ gram) * error).sum()
    den = ((weight @ gram) * weight).sum()
    return float((num.clamp_min(0) / den.clamp_min(1e-30)).sqrt())
