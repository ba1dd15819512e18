"""The batched face pipeline on tensors: detect, select, track, align, restore, parse, mask, paste. No file I/O."""
