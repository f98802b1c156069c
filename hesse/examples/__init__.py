"""Built-in data and models: real datasets needing no download and ready-to-analyse examples."""

from hesse.examples.classifiers import classifier_example
from hesse.examples.datasets import DATASETS, Dataset, load_dataset
from hesse.examples.minilm import minilm_example
from hesse.examples.models import DigitsCNN, MNIST1DCNN, train_classifier
from hesse.examples.problem import Problem

EXAMPLES = ("digits", "mnist1d", "minilm")

__all__ = [
    "DATASETS", "EXAMPLES", "Dataset", "DigitsCNN", "MNIST1DCNN", "Problem",
    "classifier_example", "load_dataset", "minilm_example", "train_classifier",
]
