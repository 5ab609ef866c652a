"""expert_t5x: train, retrieve, merge and evaluate expert language models on a frozen T5.

Importing the package is cheap: it imports neither TensorFlow nor seqio. Model code lives in
`network`, `experts`, `models`, `checkpoint_importer` (HF and T5X bases) and `checkpoints`
(training); data pipelines in the sibling `seqio_tasks`.
"""

__version__ = "0.1.0"
