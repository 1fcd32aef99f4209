"""ml_collections configs: each file has get_config(); variants override
default."""
