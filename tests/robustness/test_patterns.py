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


def test_fitting_on_a_tensor_of_examples():
    """iNNvestigate's ``analyzer.fit(X)`` takes an array of examples; fxattr iterated it example
    by example and failed with a raw conv2d RuntimeError. The analyzer now splits it into batches,
    and ``explain.fit`` on a tensor is a clear error saying what data must be."""
    from tests.models import small_cnn

    xs = torch.randn(40, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    analyzer = fxattr.create_analyzer("pattern.net", small_cnn()).fit(xs, batch_size=16)
    f, params = fxattr.functionalize(small_cnn())
    explain = fxattr.patternnet(f).fit(params, xs.split(16))
    for key, pattern in explain.patterns.items():
        torch.testing.assert_close(analyzer.explainer.patterns[key], pattern)
    with pytest.raises(fxattr.FxattrError, match=r"^fxattr\.patternnet: the model failed on a batch of shape "
                                                 r"\(3, 8, 8\).*iterable of batches"):
        fxattr.patternnet(f).fit(params, xs)
    with pytest.raises(fxattr.FxattrError, match="batch_size must be an int >= 1"):
        fxattr.create_analyzer("pattern.net", small_cnn()).fit(xs, batch_size=0)
