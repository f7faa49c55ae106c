"""Graph helpers every layer above uses: typed node access, walks, node creation, and the attention/norm
spellings (`patterns`). Knows nothing of methods, models or targets."""
