"""The networks: ruDALL-E transformer, VQ-GAN decoder, RealESRGAN and the ruCLIP ranker. No HTTP here."""
