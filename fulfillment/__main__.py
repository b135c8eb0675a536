from fulfillment.cli import main

raise SystemExit(main())
