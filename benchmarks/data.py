"""The offline CIFAR-10 and Fashion-MNIST loaders, from the package (one implementation)."""

from neuroexapt.train.npz import (  # noqa: F401
    CIFAR10_MEAN,
    CIFAR10_STD,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    Split,
    load_cifar10,
    load_fashion_mnist,
)
