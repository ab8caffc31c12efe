from session_sidecar.cli import main

raise SystemExit(main())
