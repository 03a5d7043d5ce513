"""torch.ops.piso.* in your own loop: collect one nn.Linear's Hessian with a forward hook, then
compare absmax RTN, PiSO-optimal scales + RTN, GPTQ and GPTQ ⊙ PiSO on that layer, and swap in a
QuantLinear. Runs in seconds on a tiny random Llama by default; --model takes a local HF directory
or .gguf (random token ids are used as calibration either way; use real text for real numbers).

  python examples/ops_in_your_loop.py
  python examples/ops_in_your_loop.py --model /path/to/model --layer 3 --linear mlp.down_proj --bits 3
"""
import argparse

import torch

import torch_piso  # noqa: F401  (registers torch.ops.piso.*)
from torch_piso.models import decoder_layers, tiny_model
from torch_piso.nn import QuantLinear


def layer_loss(W, W_hat, H):
    """sum over rows of (w - w_hat)^T H (w - w_hat): the layer's output error on the calibration set."""
    E = (W - W_hat).double()
    return float(torch.einsum("nd,de,ne->", E, H.double(), E))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="local HF dir or .gguf (default: a tiny random Llama)")
    ap.add_argument("--layer", type=int, default=0)
    ap.add_argument("--linear", default="self_attn.q_proj")
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=-1)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=64)
    args = ap.parse_args(argv)

    if args.model:
        from torch_piso.load import load_model
        model, _ = load_model(args.model)
    else:
        model = tiny_model("llama", seed=0)
    lin = decoder_layers(model)[args.layer].get_submodule(args.linear)
    D = lin.in_features

    # 1. H = X^T X / T through the op, from a forward pre-hook on the chosen linear
    H = torch.zeros(D, D, dtype=torch.float64)
    tokens = 0

    def hook(mod, inp):
        nonlocal tokens
        x = inp[0].detach()
        torch.ops.piso.hessian_accumulate_(H, x)
        tokens += x.numel() // D

    handle = lin.register_forward_pre_hook(hook)
    vocab = model.get_input_embeddings().num_embeddings
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(args.samples):
            model(torch.randint(0, vocab, (1, args.seqlen), generator=g), use_cache=False)
    handle.remove()
    H /= tokens
    W = lin.weight.detach().float()
    b, gs = args.bits, args.group_size
    print(f"{args.linear} of block {args.layer}: W {list(W.shape)}, H from {tokens} tokens, "
          f"{b}-bit, group size {gs}")

    # 2. absmax RTN vs PiSO-optimal scales + RTN
    qmax = 2 ** (b - 1) - 1
    Wg = W if gs == -1 else W.view(W.shape[0], -1, gs)
    absmax = (Wg.abs().amax(-1) / qmax).clamp_min(1e-12)
    _, W_rtn = torch.ops.piso.quantize_rtn(W, absmax, b, gs)
    s_piso = torch.ops.piso.optimal_scales(W, H.float(), None, b, gs)
    _, W_piso = torch.ops.piso.quantize_rtn(W, s_piso, b, gs)
    # 3. GPTQ at absmax scales, and GPTQ ⊙ PiSO (PiSO on GPTQ's own H once, before the first column)
    Hf = H.float()
    _, _, W_gptq = torch.ops.piso.gptq(W, Hf, b, gs)
    codes, scales, W_gp = torch.ops.piso.gptq(W, Hf, b, gs, None, "layer")
    rows = [("RTN absmax", W_rtn), ("RTN PiSO", W_piso), ("GPTQ absmax", W_gptq), ("GPTQ ⊙ PiSO", W_gp)]
    base = layer_loss(W, W_rtn, H)
    print(f"{'method':<14} {'layer loss':>12} {'vs absmax RTN':>14}")
    for name, What in rows:
        loss = layer_loss(W, What, H)
        print(f"{name:<14} {loss:12.4e} {loss / base:14.3f}")

    # 4. swap the linear for a packed QuantLinear holding GPTQ ⊙ PiSO's codes and scales
    q = QuantLinear.from_linear(lin, codes, scales, b, gs)
    x = torch.randn(4, D)
    with torch.no_grad():
        err = (q(x) - torch.nn.functional.linear(x, W_gp, lin.bias)).abs().max().item()
    print(f"QuantLinear({q.extra_repr()}) reproduces W_hat: max |diff| = {err:.2e}")


if __name__ == "__main__":
    main()
