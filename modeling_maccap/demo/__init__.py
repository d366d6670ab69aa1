"""`maccap demo`: MacCap end to end on an offline synthetic world (world.py), with tiny components trained here."""
