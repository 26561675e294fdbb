"""Models: video VAE, audio VAE + decoder, text encoders, the diffusion transformer. Never imports training."""
