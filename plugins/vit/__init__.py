"""Built-in ViT plugin (Dosovitskiy et al. 2021; Zhai et al. 2022 shapes; SoViT)."""
