"""Pattern files are validated on load: tampered files (NaN, integer dtype, garbage) gave results
off by 1e9 or raw safetensors errors."""

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import fxattr


def test_tampered_pattern_files_are_clear_errors(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
    f, params = fxattr.functionalize(model)
    explain = fxattr.patternnet(f).fit(params, [torch.randn(16, 4)])
    good = tmp_path / "good.safetensors"
    fxattr.save_patterns(explain.patterns, good)
    loaded = fxattr.load_patterns(good)
    x = torch.randn(4)
    torch.testing.assert_close(fxattr.patternnet(f, patterns=loaded)(params, x, 1), explain(params, x, 1))

    name = next(iter(loaded))
    cases = {
        "nan": ({**loaded, name: loaded[name].clone().fill_(float("nan"))}, r"holds NaN or Inf"),
        "integer": ({**loaded, name: (loaded[name] * 1e9).long()}, r"has dtype torch\.int64"),
    }
    for label, (patterns, message) in cases.items():
        path = tmp_path / f"{label}.safetensors"
        save_file(patterns, str(path))
        with pytest.raises(fxattr.FxattrError, match=rf"fxattr\.load_patterns: the pattern of layer {name!r} {message}"):
            fxattr.load_patterns(path)
        with pytest.raises(fxattr.FxattrError, match=rf"fxattr\.patternnet: the pattern of layer {name!r} {message}"):
            fxattr.patternnet(f, patterns=patterns)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file" * 4)
    with pytest.raises(fxattr.FxattrError, match=r"fxattr\.load_patterns: cannot read patterns from"):
        fxattr.load_patterns(garbage)
    with pytest.raises(fxattr.FxattrError, match=r"fxattr\.load_patterns: cannot read patterns from"):
        fxattr.load_patterns(tmp_path / "missing.safetensors")
    renamed = tmp_path / "renamed.safetensors"
    save_file({"elsewhere": loaded[name], **{k: v for k, v in loaded.items() if k != name}}, str(renamed))
    with pytest.raises(fxattr.FxattrError, match=rf"patterns have no entry for layer {name!r}"):
        fxattr.pattern_attribution(f, patterns=fxattr.load_patterns(renamed))
