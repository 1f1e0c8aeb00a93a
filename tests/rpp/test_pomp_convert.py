"""POMP's released prompt checkpoints -> rpp prompts: a checkpoint built in POMP's (Dassl's) layout gives the same
logits through RPPMethod as POMP's own prompt learner and text encoder, transcribed here."""

import os
from collections import OrderedDict

import open_clip
import pytest
import torch
import torch.nn.functional as F

from rpp import checkpoint
from rpp.errors import UserError
from rpp.method import MethodConfig, RPPMethod
from rpp.models import register_tiny_models
from rpp.pomp_convert import main, read_pomp_checkpoint

CLASSNAMES = ["red circle", "blue_square", "a very long class name of several words", "dog"]
N_CTX = 4


class ConstantWarmupScheduler:
    """Stands in for Dassl's scheduler object that POMP's checkpoints pickle (not loadable with weights_only)."""

    def __init__(self):
        self.successor = {"T_max": 5}
        self.warmup_epoch = 1


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def pomp_logits(clip, ctx, images, classnames):
    """POMP's PromptLearner (class token at the end) + TextEncoder + CustomCLIP at evaluation, transcribed."""
    tokenizer = open_clip.get_tokenizer("rpp-tiny")
    prompt_prefix = " ".join(["X"] * ctx.shape[0])
    names = [name.replace("_", " ") for name in classnames]
    tokenized = torch.cat([tokenizer(prompt_prefix + " " + name + ".") for name in names])
    embedding = clip.token_embedding(tokenized)
    prefix, suffix = embedding[:, :1, :], embedding[:, 1 + ctx.shape[0] :, :]
    prompts = torch.cat([prefix, ctx.unsqueeze(0).expand(len(names), -1, -1), suffix], dim=1)
    x = prompts + clip.positional_embedding
    x = clip.transformer(x, attn_mask=clip.attn_mask)  # open_clip's transformer is batch-first (NLD)
    x = clip.ln_final(x)
    text = x[torch.arange(x.shape[0]), tokenized.argmax(dim=-1)] @ clip.text_projection
    image = clip.encode_image(images)
    image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    return clip.logit_scale.exp() * image @ text.t()


def pomp_file(tmp_path, ctx, extra=None, prefix=""):
    state = OrderedDict({prefix + "ctx": ctx.half(), prefix + "train_token_prefix": torch.zeros(3, 1, 64)})
    obj = {"state_dict": state, "epoch": 5, "optimizer": {"state": {}, "param_groups": []}, "val_result": 24.9}
    obj.update(extra or {})
    path = tmp_path / "vit_b16_ep5_randaug2_unc1000_16shots_nctx4_cscFalse_ctpend_seed42.pth.tar"
    torch.save(obj, path)
    return path


@pytest.mark.usefixtures("one_thread")
def test_converted_pomp_prompts_give_pomps_logits(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    register_tiny_models()
    torch.manual_seed(0)
    student = open_clip.create_model("rpp-tiny").eval()
    weights = tmp_path / "student.pt"
    torch.save(student.state_dict(), weights)
    ctx = torch.randn(N_CTX, 64) * 0.02
    payload = pomp_file(tmp_path, ctx, {"scheduler": ConstantWarmupScheduler(), "hook": Payload()}, prefix="module.")
    with pytest.raises(UserError, match=r"refusing to read POMP checkpoint .*posix\.system"):
        read_pomp_checkpoint(payload)  # a global torch never unpickles (os.system): the file is refused
    assert not (tmp_path / "pwned.txt").exists()  # the payload in the file never ran
    path = pomp_file(tmp_path, ctx, {"scheduler": ConstantWarmupScheduler()}, prefix="module.")  # Dassl's objects

    out = tmp_path / "converted.pt"
    assert main(["--checkpoint", str(path), "--output", str(out), "--model", "rpp-tiny", "--pretrained",
                 str(weights)]) == 0  # fmt: skip
    assert not (tmp_path / "pwned.txt").exists()  # the payload in the file never ran
    converted = checkpoint.load_prompts(out)
    assert converted["method_config"]["text_prompt"] == "pomp" and converted["step"] == 5
    torch.testing.assert_close(converted["prompts"]["text.ctx"], ctx.half().float())

    cfg = {k: v for k, v in converted["method_config"].items()}
    method = RPPMethod(MethodConfig(**cfg), CLASSNAMES, "cpu")
    method.load_prompt_state_dict(converted["prompts"])
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ours = method.zero_shot_logits(images, [n.replace("_", " ") for n in CLASSNAMES])  # as POMP/CoOp and our readers
    with torch.no_grad():
        theirs = pomp_logits(student, ctx.half().float(), images, CLASSNAMES)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-4)


def test_pomp_checkpoint_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_pomp_checkpoint(tmp_path / "missing.pth.tar")
    (tmp_path / "junk.pth.tar").write_bytes(b"junk")
    with pytest.raises(UserError, match="cannot read POMP checkpoint"):
        read_pomp_checkpoint(tmp_path / "junk.pth.tar")
    torch.save({"state_dict": {"ctx": torch.zeros(10, 4, 64)}}, tmp_path / "csc.pth.tar")
    with pytest.raises(UserError, match="class-specific"):
        read_pomp_checkpoint(tmp_path / "csc.pth.tar")
    torch.save({"state_dict": {"token_prefix": torch.zeros(1)}}, tmp_path / "none.pth.tar")
    with pytest.raises(UserError, match="holds no prompt"):
        read_pomp_checkpoint(tmp_path / "none.pth.tar")
    ctx, epoch = read_pomp_checkpoint(pomp_file(tmp_path, torch.ones(4, 64)))
    assert epoch == 5 and ctx.dtype == torch.float32 and ctx.shape == (4, 64)
    assert main(["--output", str(tmp_path / "x.pt")]) == 2
