"""The numbers of the paper's GMP tables (Wang & Mao, ICLR 2022; ``reference/PAPER.md``).

Top-1 test accuracy (%), best over epochs, mean ± std of 10 runs, under the protocol of
the ``paper-gmp`` preset: 200 epochs, batch 50, SGD lr 0.1 with Nesterov momentum 0.9,
weight decay 1e-4, lr ×0.1 at epochs 100 and 150, crop (+ flip on CIFAR).
"""

from __future__ import annotations

DATASETS = ("svhn_cropped", "cifar10", "cifar100")
ROWS = {  # method label -> its row in the tables
    "erm": "ERM",
    "dropout": "Dropout",
    "label-smoothing": "Label smoothing",
    "flooding": "Flooding",
    "mixup": "MixUp",
    "adversarial": "Adversarial training",
    "amp": "AMP",
    "gmp": "GMP k=3",
    "gmp:samples=3": "GMP k=3",
    "gmp:samples=10": "GMP k=10",
}
_TABLES = {  # model -> row -> (SVHN, CIFAR-10, CIFAR-100) as (mean, std)
    "vgg16": {
        "ERM": ((96.86, 0.060), (93.68, 0.193), (72.16, 0.297)),
        "Dropout": ((97.04, 0.049), (93.78, 0.147), (72.28, 0.337)),
        "Label smoothing": ((96.93, 0.070), (93.71, 0.158), (72.51, 0.179)),
        "Flooding": ((96.85, 0.085), (93.74, 0.145), (72.07, 0.271)),
        "MixUp": ((96.91, 0.057), (94.52, 0.112), (73.19, 0.254)),
        "Adversarial training": ((97.06, 0.091), (93.51, 0.130), (70.88, 0.145)),
        "AMP": ((97.27, 0.015), (94.35, 0.147), (74.40, 0.168)),
        "GMP k=3": ((97.18, 0.057), (94.33, 0.094), (74.45, 0.256)),
        "GMP k=10": ((97.09, 0.068), (94.45, 0.158), (75.09, 0.285)),
    },
    "preactresnet18": {
        "ERM": ((97.05, 0.063), (94.98, 0.212), (75.69, 0.303)),
        "Dropout": ((97.20, 0.065), (95.14, 0.148), (75.52, 0.351)),
        "Label smoothing": ((97.22, 0.087), (95.15, 0.115), (77.93, 0.256)),
        "Flooding": ((97.16, 0.047), (95.03, 0.082), (75.50, 0.234)),
        "MixUp": ((97.26, 0.044), (95.91, 0.117), (78.22, 0.210)),
        "Adversarial training": ((97.23, 0.080), (95.01, 0.085), (74.77, 0.229)),
        "AMP": ((97.70, 0.025), (96.03, 0.091), (78.49, 0.308)),
        "GMP k=3": ((97.43, 0.037), (95.64, 0.053), (78.05, 0.208)),
        "GMP k=10": ((97.34, 0.058), (95.71, 0.073), (78.07, 0.170)),
    },
}


def reported(model: str, dataset: str, label: str) -> tuple[float, float] | None:
    """``(mean, std)`` in % of the paper's best test accuracy, or ``None`` if not in it."""
    if model not in _TABLES or dataset not in DATASETS or label not in ROWS:
        return None
    return _TABLES[model][ROWS[label]][DATASETS.index(dataset)]
