"""Start the aitraining web UI: `python launch.py [--host 127.0.0.1] [--port 7860] [--auth user:pass]`."""
import sys

from webui.app import main

if __name__ == "__main__":
    sys.exit(main())
