"""Backend-, device- and CPU-specific fast paths, behind one seam."""
