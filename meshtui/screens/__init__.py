"""The dashboard's screens: peers, split, generate, telemetry, and the help and add-peer dialogs."""
