"""The model zoo (CIFAR benchmark networks, small CNNs) and adapter modules."""
