"""fxattr demo (placeholder until the full demo lands): train a small CNN on scikit-learn's bundled
digits and explain test digits with the gradient-family methods, batched with torch.vmap."""

import time

import torch
from sklearn.datasets import load_digits

import fxattr


def main() -> None:
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(digits.target)
    x_train, y_train, x_test, y_test = x[:1500], y[:1500], x[1500:], y[1500:]
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(32, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for epoch in range(15):
        for i in range(0, len(x_train), 100):
            loss = torch.nn.functional.cross_entropy(model(x_train[i:i + 100]), y_train[i:i + 100])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    print(f"test accuracy: {accuracy:.3f}")

    f, params = fxattr.functionalize(model, input_shape=(1, 8, 8))
    methods = {
        "gradient": fxattr.gradient(f),
        "input_x_gradient": fxattr.input_x_gradient(f),
        "integrated_gradients": fxattr.integrated_gradients(f, steps=32),
        "smoothgrad": fxattr.smoothgrad(f, samples=16),
    }
    images, labels = x_test[:8], y_test[:8]
    for name, explain in methods.items():
        start = time.perf_counter()
        batched = torch.vmap(explain, in_dims=(None, 0, 0), randomness="different")
        attributions = batched(params, images, labels)
        seconds = time.perf_counter() - start
        print(f"{name:>22}: shape {tuple(attributions.shape)}, "
              f"mean |a| {attributions.abs().mean():.4f}, {1e3 * seconds:.1f} ms")
    ig = methods["integrated_gradients"]
    a = torch.vmap(ig, in_dims=(None, 0, 0))(params, images, labels)
    logits = torch.vmap(f, in_dims=(None, 0))(params, images)
    gap = (a.flatten(1).sum(1) - (logits[torch.arange(8), labels]
                                   - torch.vmap(f, in_dims=(None, 0))(params, 0 * images)[torch.arange(8), labels]))
    print(f"IG completeness error (sum of attributions - (f(x) - f(0))): max {gap.abs().max():.2e}")


if __name__ == "__main__":
    main()
