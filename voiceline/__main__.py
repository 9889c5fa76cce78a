from voiceline.cli import main

raise SystemExit(main())
