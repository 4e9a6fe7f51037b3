# Installed as the package `tdgen.presets` so the TOML files ship inside the wheel.
